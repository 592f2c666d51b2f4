//! `sweep plot`: the guide's two figures as PNG files, drawn with `plotters` (pure Rust; the
//! font is compiled in, so the coordinator's slim image needs no font packages).
//!
//! * One figure per trial (the guide's Figure 5): training and validation loss (left) and
//!   accuracy (right) per epoch, with a vertical red line at the switch from feature extraction
//!   to fine-tuning.
//! * `backbones.png` (the guide's Figure 6): for each backbone, the validation accuracy after
//!   feature extraction and the best during fine-tuning, of its best trial.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Context, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;
use sweep_proto::v1;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// Largest loss an axis reaches; anything above is drawn at the top.
const MAX_AXIS: f64 = 1e12;
const FAMILY: &str = "sans-serif";
const TRAIN: RGBColor = RGBColor(31, 119, 180);
const VAL: RGBColor = RGBColor(255, 127, 14);
const FE_BAR: RGBColor = RGBColor(158, 202, 225);
const FT_BAR: RGBColor = RGBColor(33, 113, 181);
const SHARED_BAND: RGBColor = RGBColor(160, 160, 160);

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is ours and valid; a failure would show as missing text, not a crash.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

fn draw_err<E: std::error::Error + Send + Sync>(path: &Path) -> impl Fn(DrawingAreaErrorKind<E>) -> anyhow::Error + '_ {
    move |e| anyhow!("cannot draw {}: {e}", path.display())
}

/// Picks the (train, validation) values of one panel from an epoch.
type Pick = fn(&v1::EpochMetrics) -> (f64, f64);
/// Picks one bar's value from a backbone.
type BarPick = fn(&BackboneBars) -> Option<f64>;

/// A trial's per-epoch curves.
pub struct TrialCurves<'a> {
    pub trial: &'a v1::TrialSummary,
    pub metrics: &'a [v1::EpochMetrics],
}

/// One backbone's bars: its best trial's accuracy after feature extraction, and the best during
/// fine-tuning.
#[derive(Debug, Clone, PartialEq)]
pub struct BackboneBars {
    pub backbone: String,
    pub trial: String,
    pub fe_accuracy: Option<f64>,
    pub best_ft_accuracy: Option<f64>,
}

/// Draws a trial's figure at `path` (1200×480).
pub fn trial_figure(path: &Path, c: &TrialCurves) -> anyhow::Result<()> {
    register_font();
    let t = c.trial;
    let epochs = (t.fe_epochs + t.ft_epochs).max(c.metrics.iter().map(|m| m.epoch).max().unwrap_or(1)).max(1);
    let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
    let err = draw_err(path);
    root.fill(&WHITE).map_err(&err)?;
    let title = crate::output::trial_label(t);
    let root = root.titled(&title, (FAMILY, 24)).map_err(&err)?;
    let (left, right) = root.split_horizontally(600);
    // Whatever is stored (a state written before reports were checked may hold infinite or
    // absurd values): the axis is finite and bounded, and values beyond it are drawn at its
    // edge, so ticks are always computed over a finite range.
    let max_loss = c
        .metrics
        .iter()
        .flat_map(|m| [m.train_loss, m.val_loss])
        .filter(|v| v.is_finite() && *v >= 0.0)
        .fold(0.0, f64::max)
        .min(MAX_AXIS);
    let loss_top = if max_loss > 0.0 { max_loss * 1.1 } else { 1.0 };
    let switch = t.fe_epochs as f64 + 0.5;
    let epochs_shared: Vec<(u32, Vec<String>)> = c.metrics.iter().map(|m| (m.epoch, m.shared_with.clone())).collect();
    let runs = sweep_core::stages::stored_runs(&epochs_shared);
    let panels: [(&DrawingArea<_, _>, &str, f64, f64, Pick); 2] = [
        (&left, "loss", loss_top, 1.0, |m| (m.train_loss, m.val_loss)),
        (&right, "accuracy (%)", 100.0, 100.0, |m| (m.train_accuracy, m.val_accuracy)),
    ];
    for (area, what, top, scale, pick) in panels {
        let mut chart = ChartBuilder::on(area)
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.5f64..epochs as f64 + 0.5, 0f64..top)
            .map_err(&err)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(what)
            .x_labels((epochs as usize).min(24))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| if top >= 100.0 { format!("{y:.0}") } else { format!("{y:.1}") })
            .label_style((FAMILY, 14))
            .draw()
            .map_err(&err)?;
        // Epochs computed once for several trials (a shared stage): a grey band behind them.
        let shared = SHARED_BAND.mix(0.35);
        for (i, (first, last, _)) in runs.iter().enumerate() {
            let band = Rectangle::new([(*first as f64 - 0.5, 0.0), (*last as f64 + 0.5, top)], shared.filled());
            let drawn = chart.draw_series(std::iter::once(band)).map_err(&err)?;
            if i == 0 {
                drawn
                    .label("shared with other trials")
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], shared.filled()));
            }
        }
        for (name, color, second) in [("train", TRAIN, false), ("validation", VAL, true)] {
            let points: Vec<(f64, f64)> = c
                .metrics
                .iter()
                .map(|m| {
                    let (a, b) = pick(m);
                    (m.epoch as f64, if second { b } else { a } * scale)
                })
                .filter(|(_, y)| !y.is_nan())
                .map(|(x, y)| (x, y.clamp(0.0, top)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(&err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(&err)?;
        }
        if t.ft_epochs > 0 && t.fe_epochs > 0 {
            chart
                .draw_series(std::iter::once(PathElement::new(vec![(switch, 0.0), (switch, top)], RED.stroke_width(2))))
                .map_err(&err)?
                .label("switch to fine-tuning")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(if what == "loss" { SeriesLabelPosition::UpperRight } else { SeriesLabelPosition::LowerRight })
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(&err)?;
    }
    root.present().map_err(&err)?;
    Ok(())
}

/// Draws the per-backbone figure at `path` (width grows with the number of backbones).
pub fn backbone_figure(path: &Path, sweep_id: &str, bars: &[BackboneBars]) -> anyhow::Result<()> {
    register_font();
    let n = bars.len().max(1);
    let width = (260 + 180 * n as u32).max(860);
    let root = BitMapBackend::new(path, (width, 520)).into_drawing_area();
    let err = draw_err(path);
    root.fill(&WHITE).map_err(&err)?;
    let root = root
        .titled(&format!("{sweep_id}: validation accuracy of each backbone's best trial"), (FAMILY, 22))
        .map_err(&err)?;
    let names: Vec<String> = bars.iter().map(|b| format!("{} ({})", b.backbone, b.trial)).collect();
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .x_label_area_size(44)
        .y_label_area_size(56)
        // Room above 100% for the values and the legend.
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..125.0)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("validation accuracy (%)")
        .y_labels(14)
        .y_label_formatter(&|y| if *y <= 100.0 + 1e-9 { format!("{y:.0}") } else { String::new() })
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style((FAMILY, 14))
        .draw()
        .map_err(&err)?;
    let kinds: [(&str, RGBColor, f64, BarPick); 2] = [
        ("after feature extraction", FE_BAR, -0.2, |b| b.fe_accuracy),
        ("best during fine-tuning", FT_BAR, 0.2, |b| b.best_ft_accuracy),
    ];
    for (label, color, offset, pick) in kinds {
        let values: Vec<(f64, f64)> = bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                pick(b).filter(|v| !v.is_nan()).map(|v| (i as f64 + offset, (v * 100.0).clamp(0.0, 100.0)))
            })
            .collect();
        chart
            .draw_series(values.iter().map(|&(x, v)| Rectangle::new([(x - 0.18, 0.0), (x + 0.18, v)], color.filled())))
            .map_err(&err)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.filled()));
        chart
            .draw_series(
                values
                    .iter()
                    .map(|&(x, v)| Text::new(format!("{v:.1}%"), (x - 0.14, v + 5.0), (FAMILY, 13).into_font())),
            )
            .map_err(&err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

/// Each backbone's best trial (the leaderboard's order: the first entry of a backbone is its
/// best), in order of first appearance.
pub fn backbone_bars(board: &v1::Leaderboard) -> Vec<BackboneBars> {
    let mut out: Vec<BackboneBars> = Vec::new();
    for e in &board.entries {
        if out.iter().any(|b| b.backbone == e.backbone) {
            continue;
        }
        out.push(BackboneBars {
            backbone: e.backbone.clone(),
            trial: e.trial_id.clone(),
            fe_accuracy: e.fe_val_accuracy,
            best_ft_accuracy: e.best_val_accuracy,
        });
    }
    out
}

/// Writes every figure of a sweep into `dir` (created); returns the files written.
pub fn write_all(
    dir: &Path,
    board: &v1::Leaderboard,
    trials: &[(v1::TrialSummary, Vec<v1::EpochMetrics>)],
) -> anyhow::Result<Vec<PathBuf>> {
    // Ids become file names: only ids of the shape the coordinator gives (`t003`), all checked
    // before anything is written.
    if let Some((t, _)) = trials.iter().find(|(t, _)| sweep_core::grid::trial_index(&t.trial_id).is_none()) {
        anyhow::bail!(
            "the coordinator sent a trial id `{}` that is not one (they look like t003); nothing was written",
            crate::output::escape(&t.trial_id)
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    for (trial, metrics) in trials {
        if metrics.is_empty() {
            continue;
        }
        let path = dir.join(format!("{}.png", trial.trial_id));
        trial_figure(&path, &TrialCurves { trial, metrics })?;
        written.push(path);
    }
    let bars = backbone_bars(board);
    if bars.iter().any(|b| b.fe_accuracy.is_some() || b.best_ft_accuracy.is_some()) {
        let path = dir.join("backbones.png");
        backbone_figure(&path, &board.sweep_id, &bars)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial() -> v1::TrialSummary {
        v1::TrialSummary {
            trial_id: "t001".into(),
            backbone: "resnet50".into(),
            lr_decay: Some(v1::LrDecay { strategy: "exponential".into(), head_lr: 1e-4, factor: 3.0, final_lr: 0.0 }),
            fe_epochs: 3,
            ft_epochs: 2,
            ..Default::default()
        }
    }

    fn metrics() -> Vec<v1::EpochMetrics> {
        (1..=5)
            .map(|e| v1::EpochMetrics {
                epoch: e,
                phase: if e <= 3 { "feature_extraction" } else { "fine_tuning" }.into(),
                train_loss: 2.0 / e as f64,
                train_accuracy: 0.5 + 0.08 * e as f64,
                val_loss: 2.2 / e as f64,
                val_accuracy: 0.45 + 0.09 * e as f64,
                seconds: 1.0,
                attempt_id: 1,
                shared_with: if e <= 2 { vec!["t004".into()] } else { Vec::new() },
                reused_from: String::new(),
            })
            .collect()
    }

    /// Pixels of `path` close to `color`.
    fn count(path: &Path, color: RGBColor) -> usize {
        let img = image::open(path).unwrap().to_rgb8();
        img.pixels()
            .filter(|p| {
                let d = |a: u8, b: u8| (a as i32 - b as i32).abs();
                d(p[0], color.0) < 30 && d(p[1], color.1) < 30 && d(p[2], color.2) < 30
            })
            .count()
    }

    #[test]
    fn a_trial_figure_has_both_curves_and_the_switch_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t001.png");
        trial_figure(&path, &TrialCurves { trial: &trial(), metrics: &metrics() }).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (1200, 480));
        assert!(count(&path, TRAIN) > 300, "training curves drawn");
        assert!(count(&path, VAL) > 300, "validation curves drawn");
        // Two panels, each with a full-height red line (and the legend's sample).
        assert!(count(&path, RGBColor(255, 0, 0)) > 2 * 2 * 300, "switch lines drawn");
        // Text is drawn: dark pixels beyond the axes' lines.
        assert!(count(&path, BLACK) > 2000);
        // Epochs 1–2 were shared: a grey band behind them, in both panels.
        let band = RGBColor(222, 222, 222);
        let alone: Vec<v1::EpochMetrics> =
            metrics().into_iter().map(|m| v1::EpochMetrics { shared_with: Vec::new(), ..m }).collect();
        let plain = dir.path().join("alone.png");
        trial_figure(&plain, &TrialCurves { trial: &trial(), metrics: &alone }).unwrap();
        assert!(count(&path, band) > count(&plain, band) + 2 * 30_000, "shared epochs shaded");
    }

    #[test]
    fn the_backbone_figure_has_two_bars_per_backbone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backbones.png");
        let bars = vec![
            BackboneBars {
                backbone: "resnet50".into(),
                trial: "t001".into(),
                fe_accuracy: Some(0.92),
                best_ft_accuracy: Some(0.97),
            },
            BackboneBars {
                backbone: "vgg16_bn".into(),
                trial: "t004".into(),
                fe_accuracy: Some(0.91),
                best_ft_accuracy: None,
            },
        ];
        backbone_figure(&path, "flowers-1a2b", &bars).unwrap();
        let fe = count(&path, FE_BAR);
        let ft = count(&path, FT_BAR);
        // Bars are ~0.36 of a slot wide and as tall as their accuracy: two FE bars, one FT bar.
        assert!(fe > 2 * ft / 2 && ft > 5_000, "fe {fe} ft {ft}");
    }

    /// Runs `f` on a thread; fails the test if it does not return within a minute (plotting an
    /// infinite axis used to loop forever).
    fn returns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(60)).expect("plotting did not return")
    }

    #[test]
    fn any_stored_value_plots_in_bounded_time() {
        for bad in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN, 1.7e308, f64::MAX, -1.0, 1e20] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t001.png");
            let mut m = metrics();
            m[1].train_loss = bad;
            m[2].val_loss = bad;
            m[3].val_accuracy = bad;
            m[4].train_accuracy = bad;
            let p = path.clone();
            returns(move || trial_figure(&p, &TrialCurves { trial: &trial(), metrics: &m })).unwrap();
            assert!(count(&path, VAL) > 100, "{bad}: the finite values are still drawn");
            let bars = vec![BackboneBars {
                backbone: "resnet50".into(),
                trial: "t001".into(),
                fe_accuracy: Some(bad),
                best_ft_accuracy: Some(0.5),
            }];
            let p = dir.path().join("backbones.png");
            returns(move || backbone_figure(&p, "s", &bars)).unwrap();
        }
    }

    #[test]
    fn trial_ids_that_are_not_ids_never_become_file_names() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("plots");
        let board = v1::Leaderboard { sweep_id: "s".into(), ..Default::default() };
        for bad in ["../escaped", "/tmp/x", "t001/../../y", "t\u{1b}[31m"] {
            let t = v1::TrialSummary { trial_id: bad.into(), ..trial() };
            // After a good trial: still nothing written.
            let e = write_all(&out, &board, &[(trial(), metrics()), (t, metrics())]).unwrap_err().to_string();
            assert!(e.contains("not one (they look like t003)"), "{e}");
            assert!(!e.contains('\u{1b}'), "the error is safe to print: {e:?}");
        }
        assert!(!dir.path().join("escaped.png").exists());
        assert!(!out.exists(), "nothing was written");
    }

    #[test]
    fn each_backbone_is_represented_by_its_best_trial() {
        let entry = |rank, trial: &str, backbone: &str, acc| v1::LeaderboardEntry {
            rank,
            trial_id: trial.into(),
            backbone: backbone.into(),
            best_val_accuracy: Some(acc),
            ..Default::default()
        };
        let board = v1::Leaderboard {
            sweep_id: "s".into(),
            sweep_state: "completed".into(),
            entries: vec![
                entry(1, "t002", "resnet50", 0.9),
                entry(2, "t000", "resnet18", 0.8),
                entry(3, "t003", "resnet50", 0.7),
            ],
        };
        let bars = backbone_bars(&board);
        assert_eq!(
            bars.iter().map(|b| (b.backbone.as_str(), b.trial.as_str())).collect::<Vec<_>>(),
            [("resnet50", "t002"), ("resnet18", "t000")]
        );
    }
}
