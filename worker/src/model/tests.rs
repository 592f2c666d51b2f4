//! Model tests. The expected names, shapes and counts are torchvision 0.26's `state_dict()`;
//! `worker/tests/parity.rs` checks every name, the order and the logits against torchvision
//! itself (with the repository's venv). The tests below keep the counts and the names that cover
//! every naming pattern, and need no Python.

use super::*;

fn shape_of(m: &Model, name: &str) -> Option<Vec<i64>> {
    m.state_dict().into_iter().find(|(n, _)| n == name).map(|(_, t)| t.size())
}

fn tensor(m: &Model, name: &str) -> Tensor {
    m.state_dict().into_iter().find(|(n, _)| n == name).map(|(_, t)| t.detach().copy()).unwrap()
}

#[test]
fn names_shapes_and_counts_match_torchvision() {
    // (backbone, parameter tensors, buffer tensors, names with their shapes)
    #[allow(clippy::type_complexity)]
    let cases: [(Backbone, usize, usize, &[(&str, &[i64])]); 9] = [
        (
            Backbone::Resnet18,
            62,
            60,
            &[
                ("conv1.weight", &[64, 3, 7, 7]),
                ("bn1.running_mean", &[64]),
                ("bn1.num_batches_tracked", &[]),
                ("layer1.0.conv1.weight", &[64, 64, 3, 3]),
                ("layer1.1.bn2.bias", &[64]),
                ("layer2.0.downsample.0.weight", &[128, 64, 1, 1]),
                ("layer2.0.downsample.1.running_var", &[128]),
                ("layer4.1.conv2.weight", &[512, 512, 3, 3]),
                ("fc.weight", &[1000, 512]),
                ("fc.bias", &[1000]),
            ],
        ),
        (
            Backbone::Resnet34,
            110,
            108,
            &[
                ("layer2.3.conv2.weight", &[128, 128, 3, 3]),
                ("layer3.5.bn2.num_batches_tracked", &[]),
                ("fc.weight", &[1000, 512]),
            ],
        ),
        (
            Backbone::Resnet50,
            161,
            159,
            &[
                ("layer1.0.conv1.weight", &[64, 64, 1, 1]),
                ("layer1.0.conv3.weight", &[256, 64, 1, 1]),
                ("layer1.0.downsample.0.weight", &[256, 64, 1, 1]),
                ("layer2.0.conv2.weight", &[128, 128, 3, 3]),
                ("layer3.5.conv2.weight", &[256, 256, 3, 3]),
                ("layer4.2.bn3.weight", &[2048]),
                ("fc.weight", &[1000, 2048]),
            ],
        ),
        (
            Backbone::Resnet101,
            314,
            312,
            &[("layer3.22.conv1.weight", &[256, 1024, 1, 1]), ("layer4.0.downsample.1.bias", &[2048])],
        ),
        (
            Backbone::Resnet152,
            467,
            465,
            &[("layer2.7.bn3.running_mean", &[512]), ("layer3.35.conv3.weight", &[1024, 256, 1, 1])],
        ),
        (
            Backbone::Vgg16Bn,
            58,
            39,
            &[
                ("features.0.weight", &[64, 3, 3, 3]),
                ("features.0.bias", &[64]),
                ("features.1.running_mean", &[64]),
                ("features.1.num_batches_tracked", &[]),
                ("features.7.weight", &[128, 64, 3, 3]),
                ("features.40.weight", &[512, 512, 3, 3]),
                ("features.41.weight", &[512]),
                ("features.41.running_var", &[512]),
                ("classifier.0.weight", &[4096, 25088]),
                ("classifier.3.bias", &[4096]),
                ("classifier.6.weight", &[1000, 4096]),
            ],
        ),
        (
            Backbone::EfficientnetB0,
            213,
            147,
            &[
                ("features.0.0.weight", &[32, 3, 3, 3]),
                ("features.1.0.block.0.0.weight", &[32, 1, 3, 3]),
                ("features.1.0.block.1.fc1.weight", &[8, 32, 1, 1]),
                ("features.1.0.block.1.fc1.bias", &[8]),
                ("features.1.0.block.2.1.running_var", &[16]),
                ("features.2.0.block.0.1.num_batches_tracked", &[]),
                ("features.2.0.block.1.0.weight", &[96, 1, 3, 3]),
                ("features.2.0.block.2.fc2.weight", &[96, 4, 1, 1]),
                ("features.6.3.block.3.0.weight", &[192, 1152, 1, 1]),
                ("features.8.0.weight", &[1280, 320, 1, 1]),
                ("classifier.1.weight", &[1000, 1280]),
            ],
        ),
        (
            Backbone::MobilenetV2,
            158,
            156,
            &[
                ("features.0.0.weight", &[32, 3, 3, 3]),
                ("features.1.conv.0.0.weight", &[32, 1, 3, 3]),
                ("features.1.conv.1.weight", &[16, 32, 1, 1]),
                ("features.1.conv.2.running_mean", &[16]),
                ("features.2.conv.1.0.weight", &[96, 1, 3, 3]),
                ("features.2.conv.3.num_batches_tracked", &[]),
                ("features.17.conv.2.weight", &[320, 960, 1, 1]),
                ("features.18.0.weight", &[1280, 320, 1, 1]),
                ("classifier.1.weight", &[1000, 1280]),
            ],
        ),
        (
            Backbone::Densenet121,
            364,
            363,
            &[
                ("features.conv0.weight", &[64, 3, 7, 7]),
                ("features.norm0.running_mean", &[64]),
                ("features.denseblock1.denselayer1.norm1.weight", &[64]),
                ("features.denseblock1.denselayer6.conv1.weight", &[128, 224, 1, 1]),
                ("features.denseblock3.denselayer24.conv2.weight", &[32, 128, 3, 3]),
                ("features.transition3.conv.weight", &[512, 1024, 1, 1]),
                ("features.denseblock4.denselayer16.norm2.num_batches_tracked", &[]),
                ("features.norm5.weight", &[1024]),
                ("classifier.weight", &[1000, 1024]),
            ],
        ),
    ];
    for (backbone, n_params, n_buffers, names) in cases {
        let m = Model::build(backbone, 1000, Device::Cpu).unwrap();
        let b = backbone.name();
        assert_eq!(m.named_parameters().len(), n_params, "{b} parameter tensors");
        assert_eq!(m.named_buffers().len(), n_buffers, "{b} buffer tensors");
        assert_eq!(m.parameter_count(), backbone.imagenet_parameters(), "{b} parameters");
        assert_eq!(
            m.var_store().len(),
            n_params + n_buffers,
            "{b}: every tensor in the VarStore, no renamed duplicate"
        );
        for (name, shape) in names {
            assert_eq!(shape_of(&m, name).as_deref(), Some(*shape), "{b} {name}");
        }
        // Every BatchNorm has its five tensors; counters are int64 scalars.
        for (name, t) in m.named_buffers() {
            if let Some(module) = name.strip_suffix(".num_batches_tracked") {
                assert_eq!((t.kind(), t.size()), (Kind::Int64, vec![]), "{name}");
                for s in ["weight", "bias", "running_mean", "running_var"] {
                    assert!(shape_of(&m, &format!("{module}.{s}")).is_some(), "{b} {module}.{s}");
                }
            } else {
                assert_eq!(t.kind(), Kind::Float, "{name}");
            }
            assert!(!t.requires_grad(), "buffer {name} must not require grad");
        }
        assert!(m.named_parameters().iter().all(|(_, t)| t.requires_grad()));
    }
}

#[test]
fn resnet18_has_no_downsample_in_layer1_and_vgg_params_sit_at_torchvision_indices() {
    let m = Model::build(Backbone::Resnet18, 10, Device::Cpu).unwrap();
    assert!(shape_of(&m, "layer1.0.downsample.0.weight").is_none());
    let v = Model::build(Backbone::Vgg16Bn, 10, Device::Cpu).unwrap();
    let mut idx: Vec<usize> = v
        .named_parameters()
        .iter()
        .filter_map(|(n, _)| n.strip_prefix("features.")?.split('.').next()?.parse().ok())
        .collect();
    idx.dedup();
    let want = [0, 1, 3, 4, 7, 8, 10, 11, 14, 15, 17, 18, 20, 21, 24, 25, 27, 28, 30, 31, 34, 35, 37, 38, 40, 41];
    assert_eq!(idx, want);
}

#[test]
fn layer_groups_cover_every_parameter() {
    for backbone in Backbone::all() {
        let m = Model::build(backbone, 3, Device::Cpu).unwrap();
        let groups = backbone.layer_groups();
        let assigned = m.parameter_groups();
        assert_eq!(assigned.len(), m.named_parameters().len());
        for ((name, _), g) in m.named_parameters().iter().zip(&assigned) {
            let g = g.unwrap_or_else(|| panic!("{}: {name} is in no layer group", backbone.name()));
            assert!(name == &groups[g] || name.starts_with(&format!("{}.", groups[g])), "{name} in {}", groups[g]);
            if m.is_head(name) {
                assert_eq!(g, groups.len() - 1, "the head is in the last group");
            }
        }
    }
    let m = Model::build(Backbone::Vgg16Bn, 3, Device::Cpu).unwrap();
    let names: Vec<&str> = m.named_parameters().iter().map(|(n, _)| n.as_str()).collect();
    let g = m.parameter_groups();
    assert_eq!(g[names.iter().position(|n| *n == "features.0.weight").unwrap()], Some(0));
    assert_eq!(g[names.iter().position(|n| *n == "features.41.bias").unwrap()], Some(41));
    assert_eq!(g[names.iter().position(|n| *n == "classifier.0.weight").unwrap()], Some(44));
}

#[test]
fn vgg16_bn_forward_at_32_and_64_px() {
    let m = Model::build(Backbone::Vgg16Bn, 5, Device::Cpu).unwrap();
    for s in [32, 64] {
        let x = Tensor::randn([2, 3, s, s], (Kind::Float, Device::Cpu));
        for mode in [ForwardMode::TRAIN, ForwardMode::EVAL] {
            let y = tch::no_grad(|| m.forward(&x, mode)).unwrap();
            assert_eq!(y.size(), vec![2, 5]);
            assert!(bool::try_from(y.isfinite().all()).unwrap());
        }
    }
    // Below 32 px the five pools leave nothing: an error, not a panic.
    let x = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
    assert!(tch::no_grad(|| m.forward(&x, ForwardMode::EVAL)).is_err());
}

#[test]
fn resnet_forward_and_bad_input_shapes() {
    for backbone in [Backbone::Resnet18, Backbone::Resnet50] {
        let m = Model::build(backbone, 4, Device::Cpu).unwrap();
        let y =
            tch::no_grad(|| m.forward_t(&Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu)), false)).unwrap();
        assert_eq!(y.size(), vec![3, 4]);
        assert!(m.forward_t(&Tensor::zeros([3, 1, 32, 32], (Kind::Float, Device::Cpu)), false).is_err());
        assert!(m.forward_t(&Tensor::zeros([3, 32, 32], (Kind::Float, Device::Cpu)), false).is_err());
    }
    assert!(matches!(Model::build(Backbone::Resnet18, 0, Device::Cpu), Err(ModelError::Config(_))));
    // One image at 32 px leaves one value per channel in layer4: BatchNorm cannot train on it
    // (libtorch alone would return NaN statistics), but evaluation works.
    let m = Model::build(Backbone::Resnet18, 4, Device::Cpu).unwrap();
    let one = Tensor::randn([1, 3, 32, 32], (Kind::Float, Device::Cpu));
    let e = tch::no_grad(|| m.forward(&one, ForwardMode::TRAIN)).unwrap_err();
    assert!(e.to_string().contains("more than 1 value per channel"), "{e}");
    assert!(tch::no_grad(|| m.forward(&one, ForwardMode::EVAL)).is_ok());
}

#[test]
fn initialisation_is_seeded_and_follows_torchvision() {
    let a = Model::build_seeded(Backbone::Resnet50, 10, Device::Cpu, 1).unwrap();
    let b = Model::build_seeded(Backbone::Resnet50, 10, Device::Cpu, 1).unwrap();
    let c = Model::build_seeded(Backbone::Resnet50, 10, Device::Cpu, 2).unwrap();
    for ((n, x), (_, y)) in a.state_dict().iter().zip(b.state_dict()) {
        assert!(x.equal(&y), "{n} differs between equal seeds");
    }
    assert!(!tensor(&a, "conv1.weight").equal(&tensor(&c, "conv1.weight")));
    // Kaiming normal, fan_out, ReLU gain.
    let w = tensor(&a, "layer4.0.conv2.weight");
    let std = w.std(true).double_value(&[]);
    let want = (2.0f64 / (512.0 * 9.0)).sqrt();
    assert!((std / want - 1.0).abs() < 0.01, "std {std} vs {want}");
    assert!(w.mean(Kind::Float).double_value(&[]).abs() < 1e-3);
    assert!(tensor(&a, "bn1.weight").eq(1.0).all().int64_value(&[]) == 1);
    assert!(tensor(&a, "bn1.bias").eq(0.0).all().int64_value(&[]) == 1);
    // New head: PyTorch's default nn.Linear, uniform in ±1/sqrt(fan_in).
    let bound = 1.0 / 2048f64.sqrt();
    let fc = tensor(&a, "fc.weight");
    assert!(fc.abs().max().double_value(&[]) <= bound);
    assert!(fc.abs().max().double_value(&[]) > 0.9 * bound);
    // vgg: normal(0, 0.01) linear layers with zero bias.
    let v = Model::build(Backbone::Vgg16Bn, 10, Device::Cpu).unwrap();
    let std = tensor(&v, "classifier.3.weight").std(true).double_value(&[]);
    assert!((std - 0.01).abs() < 1e-4, "{std}");
    assert!(tensor(&v, "classifier.0.bias").eq(0.0).all().int64_value(&[]) == 1);
    assert!(tensor(&v, "features.3.bias").eq(0.0).all().int64_value(&[]) == 1);
}

#[test]
fn batchnorm_statistics_follow_the_mode() {
    let m = Model::build(Backbone::Resnet18, 3, Device::Cpu).unwrap();
    let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let before = tensor(&m, "bn1.running_mean");
    for mode in [ForwardMode::EVAL, ForwardMode::TRAIN_FROZEN_BN] {
        let _ = tch::no_grad(|| m.forward(&x, mode)).unwrap();
        assert!(tensor(&m, "bn1.running_mean").equal(&before), "{mode:?} changed running stats");
        assert_eq!(tensor(&m, "bn1.num_batches_tracked").int64_value(&[]), 0);
    }
    let _ = tch::no_grad(|| m.forward(&x, ForwardMode::TRAIN)).unwrap();
    assert!(!tensor(&m, "bn1.running_mean").equal(&before));
    assert_eq!(tensor(&m, "layer4.1.bn2.num_batches_tracked").int64_value(&[]), 1);
}

#[test]
fn dropout_is_seeded_and_only_in_training() {
    let m = Model::build(Backbone::Vgg16Bn, 3, Device::Cpu).unwrap();
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let run = |mode, seed| {
        m.set_dropout_seed(seed, 1);
        tch::no_grad(|| m.forward(&x, mode)).unwrap()
    };
    // TRAIN_FROZEN_BN keeps BatchNorm fixed, so only dropout differs between calls.
    assert!(run(ForwardMode::TRAIN_FROZEN_BN, 1).equal(&run(ForwardMode::TRAIN_FROZEN_BN, 1)));
    assert!(!run(ForwardMode::TRAIN_FROZEN_BN, 1).equal(&run(ForwardMode::TRAIN_FROZEN_BN, 2)));
    assert!(run(ForwardMode::EVAL, 1).equal(&run(ForwardMode::EVAL, 2)));
}

fn write(path: &Path, tensors: &[(String, Tensor)]) {
    Tensor::write_safetensors(tensors, path).unwrap();
}

#[test]
fn load_weights_keeps_the_new_head_and_names_bad_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let src = Model::build_seeded(Backbone::Resnet18, 10, Device::Cpu, 1).unwrap();
    // Make the buffers non-trivial too.
    let _ =
        tch::no_grad(|| src.forward(&Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu)), ForwardMode::TRAIN))
            .unwrap();
    let path = dir.path().join("r18.safetensors");
    src.save_weights(&path).unwrap();

    let dst = Model::build_seeded(Backbone::Resnet18, 5, Device::Cpu, 2).unwrap();
    let head_before = tensor(&dst, "fc.weight");
    let loaded = dst.load_weights(&path).unwrap();
    assert_eq!(loaded.loaded, 120);
    assert_eq!(loaded.ignored_head, vec!["fc.bias".to_string(), "fc.weight".to_string()]);
    for ((n, a), (_, b)) in src.state_dict().iter().zip(dst.state_dict()) {
        if !dst.is_head(n) {
            assert!(a.equal(&b), "{n} not loaded");
        }
    }
    assert!(tensor(&dst, "fc.weight").equal(&head_before), "the new head must keep its random values");
    assert_eq!(tensor(&dst, "bn1.num_batches_tracked").int64_value(&[]), 1);

    let full = src.state_dict();
    let fresh = || Model::build_seeded(Backbone::Resnet18, 5, Device::Cpu, 3).unwrap();

    let p = dir.path().join("missing.safetensors");
    write(
        &p,
        &full
            .iter()
            .filter(|(n, _)| n != "layer1.0.bn1.running_var")
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect::<Vec<_>>(),
    );
    let e = fresh().load_weights(&p).unwrap_err();
    assert!(matches!(&e, ModelError::MissingTensor { name, .. } if name == "layer1.0.bn1.running_var"), "{e}");

    let p = dir.path().join("shape.safetensors");
    let mut bad: Vec<_> = full.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    bad[0].1 = Tensor::zeros([64, 3, 3, 3], (Kind::Float, Device::Cpu));
    write(&p, &bad);
    let m = fresh();
    let conv1 = tensor(&m, "conv1.weight");
    let e = m.load_weights(&p).unwrap_err();
    assert!(e.to_string().contains("`conv1.weight` has shape [64, 3, 3, 3]"), "{e}");
    assert!(
        tensor(&m, "layer4.1.conv2.weight").equal(&tensor(&fresh(), "layer4.1.conv2.weight")),
        "a refused file changes nothing"
    );
    assert!(tensor(&m, "conv1.weight").equal(&conv1));

    let p = dir.path().join("extra.safetensors");
    let mut extra: Vec<_> = full.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    extra.push(("extra.weight".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu))));
    write(&p, &extra);
    let e = fresh().load_weights(&p).unwrap_err();
    assert!(
        matches!(&e, ModelError::UnexpectedTensors { count: 1, .. }) && e.to_string().contains("`extra.weight`"),
        "{e}"
    );

    // Another backbone's file.
    let e = Model::build(Backbone::Resnet34, 5, Device::Cpu).unwrap().load_weights(&path).unwrap_err();
    assert!(matches!(&e, ModelError::MissingTensor { name, .. } if name == "layer1.2.conv1.weight"), "{e}");

    let e = fresh().load_weights(&dir.path().join("nope.safetensors")).unwrap_err();
    assert!(e.to_string().contains("nope.safetensors") && e.to_string().contains("no such file"), "{e}");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let e = fresh().load_weights(&junk).unwrap_err();
    assert!(matches!(e, ModelError::WeightsFile { .. }), "{e}");
}

#[test]
fn var_store_load_reads_safetensors_by_torchvision_name() {
    // tch's VarStore::load handles the .safetensors extension (every variable, head included).
    let dir = tempfile::tempdir().unwrap();
    let src = Model::build_seeded(Backbone::Resnet18, 10, Device::Cpu, 1).unwrap();
    let path = dir.path().join("all.safetensors");
    src.save_weights(&path).unwrap();
    let mut dst = Model::build_seeded(Backbone::Resnet18, 10, Device::Cpu, 2).unwrap();
    dst.var_store_mut().load(&path).unwrap();
    for ((n, a), (_, b)) in src.state_dict().iter().zip(dst.state_dict()) {
        assert!(a.equal(&b), "{n}");
    }
}

#[test]
fn new_families_forward_at_the_minimum_size_in_both_modes() {
    for backbone in [Backbone::EfficientnetB0, Backbone::MobilenetV2, Backbone::Densenet121] {
        let m = Model::build(backbone, 7, Device::Cpu).unwrap();
        let s = backbone.min_image_size() as i64;
        let x = Tensor::randn([2, 3, s, s], (Kind::Float, Device::Cpu));
        for mode in [ForwardMode::TRAIN, ForwardMode::EVAL, ForwardMode::TRAIN_FROZEN_BN] {
            let y = tch::no_grad(|| m.forward(&x, mode)).unwrap();
            assert_eq!(y.size(), vec![2, 7], "{}", backbone.name());
            assert!(bool::try_from(y.isfinite().all()).unwrap());
        }
    }
}

#[test]
fn initialisation_of_the_new_families_follows_torchvision() {
    // Depthwise convolutions: kaiming normal over PyTorch's fan-out (cout · k²), not the group's.
    let e = Model::build_seeded(Backbone::EfficientnetB0, 10, Device::Cpu, 1).unwrap();
    let w = tensor(&e, "features.6.0.block.1.0.weight"); // [672, 1, 5, 5]
    let std = w.std(true).double_value(&[]);
    let want = (2.0f64 / (672.0 * 25.0)).sqrt();
    assert!((std / want - 1.0).abs() < 0.05, "std {std} vs {want}");
    assert!(tensor(&e, "features.1.0.block.1.fc1.bias").eq(0.0).all().int64_value(&[]) == 1);
    // densenet: kaiming normal over the fan-in.
    let d = Model::build_seeded(Backbone::Densenet121, 10, Device::Cpu, 1).unwrap();
    let w = tensor(&d, "features.transition3.conv.weight"); // [512, 1024, 1, 1]
    let std = w.std(true).double_value(&[]);
    let want = (2.0f64 / 1024.0).sqrt();
    assert!((std / want - 1.0).abs() < 0.01, "std {std} vs {want}");
    // New heads: PyTorch's default nn.Linear.
    for (m, head, fan_in) in [(&e, "classifier.1.weight", 1280f64), (&d, "classifier.weight", 1024f64)] {
        let h = tensor(m, head);
        assert_eq!(h.size()[0], 10);
        assert!(h.abs().max().double_value(&[]) <= 1.0 / fan_in.sqrt());
    }
}

#[test]
fn stochastic_depth_and_dropout_are_seeded_and_only_in_training() {
    for backbone in [Backbone::EfficientnetB0, Backbone::MobilenetV2] {
        let m = Model::build(backbone, 3, Device::Cpu).unwrap();
        let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
        let run = |mode, seed| {
            m.set_dropout_seed(seed, 1);
            tch::no_grad(|| m.forward(&x, mode)).unwrap()
        };
        let b = backbone.name();
        // Training-mode BatchNorm normalises with batch statistics, so the output depends on the
        // masks only (with running statistics 0 and 1 these freshly built deep networks pass
        // almost no signal in evaluation mode, and dropout would not show).
        assert!(run(ForwardMode::TRAIN, 1).equal(&run(ForwardMode::TRAIN, 1)), "{b}");
        assert!(!run(ForwardMode::TRAIN, 1).equal(&run(ForwardMode::TRAIN, 2)), "{b}");
        assert!(run(ForwardMode::EVAL, 1).equal(&run(ForwardMode::EVAL, 2)), "{b}");
    }
}

#[test]
fn stochastic_depth_drops_whole_rows() {
    let x = Tensor::ones([1000, 2, 3, 3], (Kind::Float, Device::Cpu));
    let mut rng = Rng::new(5);
    let y = stochastic_depth(&x, 0.25, &mut rng).unwrap();
    // Every row is all zeros or all 1 / 0.75.
    let per_row = y.view([1000, 18]);
    let kept = per_row.sum_dim_intlist(1, false, Kind::Float).divide_scalar(18.0);
    let scale = (1.0 / 0.75f32) as f64;
    let mut n_kept = 0;
    for i in 0..1000 {
        let v = kept.double_value(&[i]);
        assert!(v == 0.0 || (v - scale).abs() < 1e-6, "row {i}: {v}");
        n_kept += (v > 0.0) as i32;
    }
    assert!((700..800).contains(&n_kept), "{n_kept} of 1000 rows kept at p = 0.25");
    assert!(stochastic_depth(&x, 0.0, &mut rng).unwrap().equal(&x));
}

#[test]
fn make_divisible_matches_torchvision() {
    // torchvision's _make_divisible(v, 8).
    for (v, want) in [(32.0, 32), (16.0 * 6.0, 96), (3.0, 8), (12.0, 16), (36.0, 40), (1280.0 * 1.0, 1280), (20.0, 24)]
    {
        assert_eq!(make_divisible(v, 8), want, "{v}");
    }
}
