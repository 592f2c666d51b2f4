//! `sweep-worker inspect` and `sweep-worker predict`.

use crate::common;

use sweep_core::Backbone;
use sweep_core::lr::LrDecay;
use sweep_worker::checkpoint::{Identity, TrialCheckpoints};
use sweep_worker::model::{ForwardMode, Model};
use sweep_worker::tools::{self, PredictOptions, Predictor};
use sweep_worker::{augment, data};
use tch::{Device, Kind, Tensor};

fn close(a: f64, b: f64) -> bool {
    ((a - b) / b).abs() < 1e-6
}

#[test]
fn inspect_gives_the_recipes_resnet50_exponential_rates() {
    let _bound = sweep_tests::bound(600);
    let i = tools::inspect(Backbone::Resnet50, 1000, Some(&LrDecay::Exponential { head_lr: 1e-4, factor: 3.0 }), 1e-8)
        .unwrap();
    assert_eq!(i.parameters, 25_557_032);
    assert_eq!((i.head.as_str(), i.classifier.as_str()), ("fc", "fc"));
    let lrs: Vec<(&str, f64)> = i.groups.iter().map(|g| (g.name.as_str(), g.lr.unwrap())).collect();
    let want = [
        ("conv1", 1.3717421e-7),
        ("bn1", 4.1152263e-7),
        ("layer1", 1.2345679e-6),
        ("layer2", 3.7037037e-6),
        ("layer3", 1.1111111e-5),
        ("layer4", 3.3333333e-5),
        ("fc", 1e-4),
    ];
    for ((name, lr), (wname, wlr)) in lrs.iter().zip(want) {
        assert_eq!(*name, wname);
        assert!(close(*lr, wlr), "{name}: {lr} vs {wlr}");
    }
    assert!(i.ungrouped.is_empty(), "every resnet parameter is in a group: {:?}", i.ungrouped);
    assert_eq!(i.groups.iter().map(|g| g.parameters).sum::<u64>(), i.parameters);
    assert_eq!(i.groups[6].params, vec!["fc.weight", "fc.bias"]);
}

#[test]
fn inspect_gives_the_recipes_vgg16_bn_linear_rates_as_json() {
    let _bound = sweep_tests::bound(600);
    let i =
        tools::inspect(Backbone::Vgg16Bn, 102, Some(&LrDecay::Linear { head_lr: 1e-4, final_lr: 1e-7 }), 1e-8).unwrap();
    let json: serde_json::Value = serde_json::to_value(&i).unwrap();
    assert_eq!(json["backbone"], "vgg16_bn");
    assert_eq!(json["default_lr"], 1e-8);
    let groups = json["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 45);
    assert_eq!(groups[0]["name"], "features.0");
    assert!(close(groups[0]["lr"].as_f64().unwrap(), 1e-7));
    assert!(close(groups[43]["lr"].as_f64().unwrap(), 9.772_954_545_454_5e-5));
    assert_eq!(groups[2]["params"].as_array().unwrap().len(), 0, "features.2 is a ReLU");
    assert_eq!(groups[44]["name"], "classifier");
    assert_eq!(groups[44]["lr"], 1e-4);
    assert_eq!(groups[44]["params"].as_array().unwrap().len(), 6);
    // The new head has 102 outputs: 138,365,992 - 4097 * (1000 - 102).
    assert_eq!(json["parameters"], 138_365_992 - 4097 * 898);
    // No strategy: no learning rates.
    let plain = tools::inspect(Backbone::Resnet18, 10, None, 1e-8).unwrap();
    assert!(plain.groups.iter().all(|g| g.lr.is_none()));
}

fn png(dir: &std::path::Path, name: &str, colour: [u8; 3]) -> std::path::PathBuf {
    let mut img = image::RgbImage::new(48, 40);
    for (x, y, p) in img.enumerate_pixels_mut() {
        *p = image::Rgb([colour[0].wrapping_add(x as u8), colour[1], colour[2].wrapping_add(y as u8)]);
    }
    let path = dir.join(name);
    img.save(&path).unwrap();
    path
}

#[test]
fn predict_uses_the_checkpoint_metadata_and_the_validation_transforms() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    let model = Model::build_seeded(Backbone::Resnet18, 3, Device::Cpu, 5).unwrap();
    let classes = vec!["daisy".to_string(), "rose".into(), "tulip".into()];
    let id = Identity {
        sweep: "s".into(),
        trial: "t000".into(),
        attempt: 1,
        backbone: "resnet18".into(),
        classes: classes.clone(),
        image_size: 32,
        spec_yaml: String::new(),
    };
    let metrics = sweep_core::leaderboard::EpochMetrics {
        epoch: 1,
        phase: sweep_core::leaderboard::Phase::FeatureExtraction,
        train_loss: 1.0,
        train_accuracy: 0.5,
        val_loss: 1.0,
        val_accuracy: 0.5,
        seconds: 1.0,
    };
    let store = common::local_store(dir.path());
    let (last, _) = TrialCheckpoints::new(&store, id).unwrap().after_epoch(&model, &metrics).unwrap();
    let last_path = std::path::PathBuf::from(&last.uri);
    let a = png(dir.path(), "a.png", [200, 30, 30]);
    let b = png(dir.path(), "b.png", [20, 30, 220]);

    // No --backbone: the metadata beside the weights names it.
    let options = PredictOptions {
        backbone: None,
        weights: last_path.clone(),
        num_classes: None,
        image_size: None,
        top: 3,
        device: Device::Cpu,
    };
    let p = Predictor::load(&options).unwrap();
    assert_eq!(p.image_size(), 32);
    for image in [&a, &b] {
        let got = p.predict(image).unwrap();
        assert_eq!(got.predictions.len(), 3);
        let sum: f64 = got.predictions.iter().map(|q| q.probability).sum();
        assert!((sum - 1.0).abs() < 1e-5, "{sum}");
        assert!(got.predictions.windows(2).all(|w| w[0].probability >= w[1].probability));
        // The same numbers as the model itself on the validation transform of the image.
        let pixels = data::decode_image(image, 32).unwrap();
        let x = Tensor::from_slice(&pixels).view([1, 3, 32, 32]);
        let probs = tch::no_grad(|| {
            model.forward(&augment::eval_batch(&x).unwrap(), ForwardMode::EVAL).unwrap().softmax(1, Kind::Float)
        });
        for q in &got.predictions {
            assert_eq!(q.class, classes[q.index as usize]);
            let want = probs.double_value(&[0, q.index]);
            assert!((q.probability - want).abs() < 1e-6, "{} vs {want}", q.probability);
        }
    }

    // A backbone given must be the metadata's.
    assert!(Predictor::load(&PredictOptions { backbone: Some(Backbone::Resnet18), ..options.clone() }).is_ok());
    let e = Predictor::load(&PredictOptions { backbone: Some(Backbone::Resnet50), ..options.clone() }).err().unwrap();
    assert!(e.to_string().contains("holds resnet18 weights"), "{e}");

    // Without metadata: the backbone must be given; the class count comes from the head's
    // shape, names are indices.
    std::fs::remove_file(last_path.with_extension("json")).unwrap();
    let e = Predictor::load(&options).err().unwrap();
    assert!(e.to_string().contains("--backbone") && e.to_string().contains("no metadata"), "{e}");
    let p = Predictor::load(&PredictOptions { top: 2, backbone: Some(Backbone::Resnet18), ..options.clone() }).unwrap();
    assert_eq!(p.image_size(), 224);
    let got = p.predict(&a).unwrap();
    assert_eq!(got.predictions.len(), 2);
    assert!(got.predictions.iter().all(|q| q.class == q.index.to_string()));
}

#[test]
fn predict_refuses_bad_input_with_clear_errors() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    let model = Model::build_seeded(Backbone::Resnet18, 4, Device::Cpu, 5).unwrap();
    let weights = dir.path().join("w.safetensors");
    model.save_weights(&weights).unwrap();
    let options = PredictOptions {
        backbone: Some(Backbone::Resnet18),
        weights: weights.clone(),
        num_classes: None,
        image_size: Some(32),
        top: 5,
        device: Device::Cpu,
    };
    let p = Predictor::load(&options).unwrap();
    let e = p.predict(&dir.path().join("missing.jpg")).unwrap_err();
    assert!(e.to_string().contains("missing.jpg"), "{e}");
    let e = Predictor::load(&PredictOptions { top: 0, ..options.clone() }).err().unwrap();
    assert!(e.to_string().contains("--top"), "{e}");
    let e = Predictor::load(&PredictOptions { backbone: Some(Backbone::Resnet50), ..options.clone() }).err().unwrap();
    assert!(e.to_string().contains("fc.weight") || e.to_string().contains("w.safetensors"), "{e}");
    std::fs::write(dir.path().join("junk.safetensors"), b"not a safetensors file at all").unwrap();
    let e = Predictor::load(&PredictOptions { weights: dir.path().join("junk.safetensors"), ..options.clone() })
        .err()
        .unwrap();
    assert!(e.to_string().contains("junk.safetensors"), "{e}");
}

#[test]
fn flat_and_per_parameter_adam_stay_bit_identical_on_a_real_model() {
    let _bound = sweep_tests::bound(600);
    // What scripts/gpu-check.sh asks of a card (`sweep-worker bench --compare-adam`), on the CPU.
    for backbone in [Backbone::Resnet18, Backbone::MobilenetV2] {
        let c = tools::compare_adam_layouts(&tools::BenchOptions {
            backbone,
            batch: 4,
            image_size: 32,
            steps: 3,
            warmup: 0,
            fp16: false,
            flat_adam: None,
            device: Device::Cpu,
        })
        .unwrap();
        assert!(c.identical, "{c:?}");
        assert_eq!(c.parameters, Model::build(backbone, 1000, Device::Cpu).unwrap().named_parameters().len());
    }
}
