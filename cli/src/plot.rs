//! `sweep plot`: the guide's two figures as PNG files, drawn with `plotters` (pure Rust; the
//! font is compiled in, so the coordinator's slim image needs no font packages).
//!
//! * One figure per trial (the guide's Figure 5): training and validation loss (left) and
//!   accuracy (right) per epoch, with a vertical red line at the switch from feature extraction
//!   to fine-tuning, the best fine-tuning epoch ringed, and chance level (1/classes) dashed
//!   when the spec tells the class count.
//! * `backbones.png` (the guide's Figure 6): for each backbone, the validation accuracy after
//!   feature extraction and the best during fine-tuning, of its best trial, with its parameters
//!   and the device time of all its trials (each computed epoch once).
//!
//! Grids are major lines only, faint (minor lines read as hatching at this size), and an axis
//! labels every tick it draws.

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
const BEST: RGBColor = RGBColor(44, 160, 44);
const CHANCE: RGBColor = RGBColor(110, 110, 110);
/// Grid lines: major only, faint.
const GRID: RGBAColor = RGBAColor(0, 0, 0, 0.12);

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
    /// Chance level (1/classes), when the spec tells the class count.
    pub chance: Option<f64>,
}

/// The trial's best fine-tuning epoch and its validation accuracy (the leaderboard's: the
/// highest, the earliest of equals).
pub fn best_epoch(fe_epochs: u32, metrics: &[v1::EpochMetrics]) -> Option<(u32, f64)> {
    metrics.iter().filter(|m| m.epoch > fe_epochs && m.val_accuracy.is_finite()).fold(
        None,
        |best: Option<(u32, f64)>, m| match best {
            Some((e, v)) if v > m.val_accuracy || (v == m.val_accuracy && e < m.epoch) => Some((e, v)),
            _ => Some((m.epoch, m.val_accuracy)),
        },
    )
}

/// One backbone's bars: its best trial's accuracy after feature extraction, and the best during
/// fine-tuning.
#[derive(Debug, Clone, PartialEq)]
pub struct BackboneBars {
    pub backbone: String,
    pub trial: String,
    pub fe_accuracy: Option<f64>,
    pub best_ft_accuracy: Option<f64>,
    /// Parameters of its best trial's model (0: not reported yet).
    pub parameters: u64,
    /// Seconds of every epoch its trials computed in this sweep (an epoch shared by several
    /// trials once; epochs reused from an earlier sweep cost nothing here).
    pub device_seconds: f64,
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
            .bold_line_style(GRID)
            .light_line_style(TRANSPARENT)
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
        if what != "loss" {
            if let Some(chance) = c.chance.filter(|c| c.is_finite() && *c > 0.0 && *c < 1.0) {
                let y = chance * 100.0;
                chart
                    .draw_series(DashedLineSeries::new(
                        vec![(0.5, y), (epochs as f64 + 0.5, y)],
                        8,
                        5,
                        CHANCE.stroke_width(1),
                    ))
                    .map_err(&err)?
                    .label(format!("chance ({y:.1}%)"))
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], CHANCE.stroke_width(1)));
            }
            if let Some((epoch, acc)) = best_epoch(t.fe_epochs, c.metrics) {
                let at = (epoch as f64, (acc * 100.0).clamp(0.0, top));
                chart
                    .draw_series(std::iter::once(Circle::new(at, 8, BEST.stroke_width(3))))
                    .map_err(&err)?
                    .label(format!("best fine-tuning: {:.1}% at epoch {epoch}", acc * 100.0))
                    .legend(|(x, y)| Circle::new((x + 10, y), 5, BEST.stroke_width(2)));
            }
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
    let full = BitMapBackend::new(path, (width, 560)).into_drawing_area();
    let err = draw_err(path);
    full.fill(&WHITE).map_err(&err)?;
    let root = full
        .titled(&format!("{sweep_id}: validation accuracy of each backbone's best trial"), (FAMILY, 22))
        .map_err(&err)?;
    let names: Vec<String> = bars.iter().map(|b| format!("{} ({})", b.backbone, b.trial)).collect();
    // The axis ends just above 100% (room for a value over a full bar) with a labelled tick
    // every 10%; the legend and each backbone's cost go in the margin above it.
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .margin_top(80)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..106.0)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("validation accuracy (%)")
        .y_labels(11)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
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
    let kinds: [(RGBColor, f64, BarPick); 2] =
        [(FE_BAR, -0.2, |b| b.fe_accuracy), (FT_BAR, 0.2, |b| b.best_ft_accuracy)];
    for (color, offset, pick) in kinds {
        let values: Vec<(f64, f64)> = bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                pick(b).filter(|v| !v.is_nan()).map(|v| (i as f64 + offset, (v * 100.0).clamp(0.0, 100.0)))
            })
            .collect();
        chart
            .draw_series(values.iter().map(|&(x, v)| Rectangle::new([(x - 0.18, 0.0), (x + 0.18, v)], color.filled())))
            .map_err(&err)?;
        chart
            .draw_series(
                values
                    .iter()
                    .map(|&(x, v)| Text::new(format!("{v:.1}%"), (x - 0.14, v + 5.0), (FAMILY, 13).into_font())),
            )
            .map_err(&err)?;
    }
    // What each backbone cost, above its bars: its best trial's size, the device time of all
    // its trials.
    let font = (FAMILY, 13).into_font().color(&CHANCE);
    for (i, b) in bars.iter().enumerate() {
        let params = if b.parameters > 0 { crate::output::count(b.parameters) } else { "-".into() };
        let text = format!("{params} params, {} device", crate::output::duration(b.device_seconds));
        let (x, y) = chart.backend_coord(&(i as f64 - 0.42, 106.0));
        full.draw(&Text::new(text, (x, y - 22), font.clone())).map_err(&err)?;
    }
    // The legend, above the plot at its right.
    let (right, top) = chart.backend_coord(&(n as f64 - 0.5, 106.0));
    let legend = (FAMILY, 14).into_font().color(&BLACK);
    for (k, (label, color)) in
        [("after feature extraction", FE_BAR), ("best during fine-tuning", FT_BAR)].iter().enumerate()
    {
        let x = right - 420 + 210 * k as i32;
        let y = top - 52;
        full.draw(&Rectangle::new([(x, y), (x + 16, y + 10)], color.filled())).map_err(&err)?;
        full.draw(&Text::new(label.to_string(), (x + 22, y - 2), legend.clone())).map_err(&err)?;
    }
    full.present().map_err(&err)?;
    Ok(())
}

/// Each backbone's best trial (the leaderboard's order: the first entry of a backbone is its
/// best), in order of first appearance.
pub fn backbone_bars(
    board: &v1::Leaderboard,
    trials: &[(v1::TrialSummary, Vec<v1::EpochMetrics>)],
) -> Vec<BackboneBars> {
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
            parameters: e.parameters,
            device_seconds: 0.0,
        });
    }
    // An epoch shared by several trials is stored for each: it counts once, by the trials it
    // belongs to and its number.
    let mut seen = std::collections::HashSet::new();
    for (t, metrics) in trials {
        let Some(bar) = out.iter_mut().find(|b| b.backbone == t.backbone) else { continue };
        for m in metrics {
            if !m.reused_from.is_empty() || !m.seconds.is_finite() || m.seconds < 0.0 {
                continue;
            }
            let mut group: Vec<&str> = m.shared_with.iter().map(String::as_str).collect();
            group.push(&t.trial_id);
            group.sort_unstable();
            if seen.insert((m.epoch, group.join(","))) {
                bar.device_seconds += m.seconds;
            }
        }
    }
    out
}

/// Writes every figure of a sweep into `dir` (created); returns the files written.
pub fn write_all(
    dir: &Path,
    board: &v1::Leaderboard,
    trials: &[(v1::TrialSummary, Vec<v1::EpochMetrics>)],
    chance: Option<f64>,
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
        trial_figure(&path, &TrialCurves { trial, metrics, chance })?;
        written.push(path);
    }
    let bars = backbone_bars(board, trials);
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
        trial_figure(&path, &TrialCurves { trial: &trial(), metrics: &metrics(), chance: Some(0.25) }).unwrap();
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
        trial_figure(&plain, &TrialCurves { trial: &trial(), metrics: &alone, chance: Some(0.25) }).unwrap();
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
                parameters: 23_528_522,
                device_seconds: 187.0,
            },
            BackboneBars {
                backbone: "vgg16_bn".into(),
                trial: "t004".into(),
                fe_accuracy: Some(0.91),
                best_ft_accuracy: None,
                parameters: 0,
                device_seconds: 0.0,
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
            returns(move || trial_figure(&p, &TrialCurves { trial: &trial(), metrics: &m, chance: Some(bad) }))
                .unwrap();
            assert!(count(&path, VAL) > 100, "{bad}: the finite values are still drawn");
            let bars = vec![BackboneBars {
                backbone: "resnet50".into(),
                trial: "t001".into(),
                fe_accuracy: Some(bad),
                best_ft_accuracy: Some(0.5),
                parameters: u64::MAX,
                device_seconds: bad,
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
            let e = write_all(&out, &board, &[(trial(), metrics()), (t, metrics())], None).unwrap_err().to_string();
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
        // Device time: every epoch its trials computed here, an epoch shared by several once,
        // epochs reused from an earlier sweep not at all.
        let t =
            |id: &str, backbone: &str| v1::TrialSummary { trial_id: id.into(), backbone: backbone.into(), ..trial() };
        let m = |epoch, seconds, shared: &[&str], reused: &str| v1::EpochMetrics {
            epoch,
            seconds,
            shared_with: shared.iter().map(|s| s.to_string()).collect(),
            reused_from: reused.into(),
            ..Default::default()
        };
        let trials = vec![
            (t("t002", "resnet50"), vec![m(1, 10.0, &["t003"], ""), m(2, 5.0, &[], "")]),
            (t("t003", "resnet50"), vec![m(1, 10.0, &["t002"], ""), m(2, 7.0, &[], "")]),
            (t("t000", "resnet18"), vec![m(1, 3.0, &[], "old-1/t000"), m(2, 4.0, &[], "")]),
        ];
        let bars = backbone_bars(&board, &trials);
        assert_eq!(
            bars.iter().map(|b| (b.backbone.as_str(), b.trial.as_str(), b.device_seconds)).collect::<Vec<_>>(),
            [("resnet50", "t002", 22.0), ("resnet18", "t000", 4.0)]
        );
    }

    #[test]
    fn the_best_fine_tuning_epoch_is_ringed_and_chance_is_dashed() {
        // Epoch 5 is the best fine-tuning epoch (0.90); epochs 1–3 are feature extraction.
        assert_eq!(best_epoch(3, &metrics()), Some((5, 0.45 + 0.09 * 5.0)));
        assert_eq!(best_epoch(5, &metrics()), None, "no fine-tuning epoch yet");
        let mut tie = metrics();
        tie[4].val_accuracy = tie[3].val_accuracy;
        assert_eq!(best_epoch(3, &tie).map(|b| b.0), Some(4), "the earliest of equals");
        let dir = tempfile::tempdir().unwrap();
        let with = dir.path().join("with.png");
        let without = dir.path().join("without.png");
        trial_figure(&with, &TrialCurves { trial: &trial(), metrics: &metrics(), chance: Some(0.25) }).unwrap();
        trial_figure(&without, &TrialCurves { trial: &trial(), metrics: &[], chance: None }).unwrap();
        assert!(count(&with, BEST) > 150, "best epoch ringed");
        assert_eq!(count(&without, BEST), 0);
        assert!(count(&with, CHANCE) > count(&without, CHANCE) + 150, "chance line drawn");
    }
}
