//! Following a sweep: `sweep watch`, `sweep submit --watch`, and the progress of `sweep run`.
//!
//! A [`View`] is fed the events of `WatchSweep` and shows them one of two ways:
//!
//! * **live** (on a terminal): a header with the sweep's counts, elapsed time and ETA over a bar
//!   of all epochs, and one progress bar per running trial with its phase, epoch and latest
//!   validation accuracy; a line is printed above the bars when a trial starts over or ends;
//! * **lines** (anything else: a file, a pipe, CI logs): one plain line per change.
//!
//! [`follow`] keeps the stream open until the sweep ends. When the stream breaks (the
//! coordinator restarted, the network dropped) it reconnects and passes the last sequence
//! number it saw, so nothing is shown twice and nothing is missed.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::bail;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sweep_core::state::TrialState;
use sweep_proto::v1;

use crate::client::Client;
use crate::output;

/// Where a view writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn is_terminal(self) -> bool {
        match self {
            Stream::Stdout => std::io::stdout().is_terminal(),
            Stream::Stderr => std::io::stderr().is_terminal(),
        }
    }
}

struct Live {
    multi: MultiProgress,
    header: ProgressBar,
    bars: BTreeMap<String, ProgressBar>,
}

/// What the watcher knows of a sweep, and how it shows it.
pub struct View {
    stream: Stream,
    /// Print each event as a JSON line instead of showing it.
    json: bool,
    live: Option<Live>,
    start: Instant,
    sweep_id: String,
    trials: BTreeMap<String, v1::TrialSummary>,
    /// Sum and count of the epoch durations seen, for the ETA.
    epoch_seconds: (f64, u32),
    /// Trials pretraining their backbone (or waiting for another worker's), from the notes
    /// the coordinator logs; a trial leaves when its first epoch comes or it ends.
    pretraining: BTreeMap<String, sweep_core::records::PretrainProgress>,
    ended: Option<v1::SweepSummary>,
}

/// Whether a trial or sweep state is final.
pub use sweep_proto::is_final;

impl View {
    /// A view on `stream`: live when it is a terminal (and `live` is allowed), else lines.
    pub fn new(stream: Stream, live: bool) -> View {
        let live = (live && stream.is_terminal()).then(|| {
            let target = match stream {
                Stream::Stdout => ProgressDrawTarget::stdout(),
                Stream::Stderr => ProgressDrawTarget::stderr(),
            };
            let multi = MultiProgress::with_draw_target(target);
            let header = multi.add(ProgressBar::new(1));
            header.set_style(
                ProgressStyle::with_template("{msg}\n{wide_bar:.green/white} {pos}/{len} epochs")
                    .expect("valid template")
                    .progress_chars("━━─"),
            );
            header.enable_steady_tick(Duration::from_secs(1));
            Live { multi, header, bars: BTreeMap::new() }
        });
        View {
            stream,
            json: false,
            live,
            start: Instant::now(),
            sweep_id: String::new(),
            trials: BTreeMap::new(),
            epoch_seconds: (0.0, 0),
            pretraining: BTreeMap::new(),
            ended: None,
        }
    }

    /// A view that prints every event as one JSON line on stdout (messages of its own go to
    /// stderr).
    pub fn json() -> View {
        View { json: true, ..View::new(Stream::Stdout, false) }
    }

    /// Whether the view draws progress bars.
    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    /// The sweep's final summary, once the `ended` event came.
    pub fn ended(&self) -> Option<&v1::SweepSummary> {
        self.ended.as_ref()
    }

    /// Prints a line (above the bars when live), stamped with the time since the view began.
    pub fn say(&self, text: &str) {
        let e = self.start.elapsed().as_secs_f64();
        // Names, errors and notes come from the coordinator: nothing in them may steer the
        // terminal.
        let line = format!("[{:>6}] {}", output::duration(e.max(1.0)), output::terminal(text));
        if self.json {
            eprintln!("{line}");
            return;
        }
        match (&self.live, self.stream) {
            (Some(l), _) => {
                let _ = l.multi.println(line);
            }
            (None, Stream::Stdout) => println!("{line}"),
            (None, Stream::Stderr) => eprintln!("{line}"),
        }
    }

    /// Counts by state, as the trials stand now.
    pub fn counts(&self) -> v1::TrialCounts {
        let mut c = v1::TrialCounts::default();
        for t in self.trials.values() {
            if let Some(state) = TrialState::parse(&t.state) {
                c.add(state, 1);
            }
        }
        c
    }

    /// `3/8 completed, 2 running`, from the trials as they stand.
    pub fn counts_line(&self) -> String {
        let summary = v1::SweepSummary {
            trial_count: self.trials.len() as u32,
            counts: Some(self.counts()),
            ..Default::default()
        };
        output::counts_line(&summary)
    }

    /// Seconds until every trial that has not ended is done, at the mean epoch time seen so far
    /// and the current parallelism; `None` before the first epoch.
    pub fn eta_seconds(&self) -> Option<f64> {
        let (sum, n) = self.epoch_seconds;
        if n == 0 {
            return None;
        }
        Some(self.epochs_eta(sum / n as f64) + self.pretraining_left().unwrap_or(0.0))
    }

    /// Seconds the pretraining under way still needs (the longest of them; they run side by
    /// side, before their trials' epochs), when known.
    pub fn pretraining_left(&self) -> Option<f64> {
        self.pretraining.values().filter_map(sweep_core::records::PretrainProgress::remaining_seconds).reduce(f64::max)
    }

    fn epochs_eta(&self, per_epoch: f64) -> f64 {
        let remaining: u32 = self
            .trials
            .values()
            .filter(|t| !is_final(&t.state))
            .map(|t| (t.fe_epochs + t.ft_epochs).saturating_sub(t.epochs_done))
            .sum();
        let parallel =
            self.trials.values().filter(|t| TrialState::parse(&t.state) == Some(TrialState::Running)).count().max(1);
        remaining as f64 * per_epoch / parallel as f64
    }

    fn refresh_header(&self) {
        let Some(l) = &self.live else { return };
        let total: u32 = self.trials.values().map(|t| t.fe_epochs + t.ft_epochs).sum();
        let done: u32 = self
            .trials
            .values()
            .map(|t| if is_final(&t.state) { t.fe_epochs + t.ft_epochs } else { t.epochs_done })
            .sum();
        l.header.set_length(total.max(1) as u64);
        l.header.set_position(done as u64);
        let eta = match (self.eta_seconds(), self.pretraining_left()) {
            (Some(s), _) if s > 0.0 => format!("ETA ~{}", output::duration(s)),
            (Some(_), _) => "ETA -".into(),
            (None, Some(p)) => format!("pretraining ~{} more, then ETA after the first epoch", output::duration(p)),
            (None, None) if !self.pretraining.is_empty() => "pretraining; ETA after the first epoch".into(),
            (None, None) => "ETA after the first epoch".into(),
        };
        l.header.set_message(format!(
            "sweep {} · {} · {} elapsed · {eta}",
            output::escape(&self.sweep_id),
            self.counts_line(),
            output::duration(self.start.elapsed().as_secs_f64().max(1.0))
        ));
    }

    fn bar_for(&mut self, t: &v1::TrialSummary) {
        let Some(l) = &mut self.live else { return };
        if t.state != "running" {
            if let Some(b) = l.bars.remove(&t.trial_id) {
                b.finish_and_clear();
                l.multi.remove(&b);
            }
            return;
        }
        let bar = l.bars.entry(t.trial_id.clone()).or_insert_with(|| {
            let b = l.multi.add(ProgressBar::new(1));
            b.set_style(
                ProgressStyle::with_template("{prefix:<44} [{bar:24.cyan/blue}] {pos:>2}/{len:<2} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b
        });
        bar.set_prefix(output::escape(&output::trial_label(t)));
        bar.set_length((t.fe_epochs + t.ft_epochs) as u64);
        bar.set_position(t.epochs_done as u64);
        let phase = if t.epochs_done < t.fe_epochs { "feature_extraction" } else { "fine_tuning" };
        bar.set_message(format!(
            "{phase:<18} val {:>6} best ft {:>6}  on {}",
            output::percent(t.latest_val_accuracy),
            output::percent(t.best_val_accuracy),
            if t.worker_id.is_empty() { "-".to_string() } else { output::escape(&t.worker_id) }
        ));
    }

    /// The first message of a stream: every trial as it stands. On a stream that resumes after
    /// a break, the events missed follow it and tell the story in order, so the snapshot only
    /// adds trials not seen yet.
    pub fn snapshot(&mut self, s: &v1::SweepStatus, resumed: bool) {
        if let Some(sw) = &s.sweep {
            self.sweep_id = sw.id.clone();
        }
        for t in &s.trials {
            if resumed && self.trials.contains_key(&t.trial_id) {
                continue;
            }
            self.trials.insert(t.trial_id.clone(), t.clone());
            self.bar_for(t);
        }
        if !resumed && let Some(sw) = &s.sweep {
            self.say(&format!("following sweep {} ({}): {}", sw.id, sw.state, self.counts_line()));
        }
        self.refresh_header();
    }

    /// A trial changed: started, finished an epoch, ended, or has a note.
    pub fn trial(&mut self, e: &v1::TrialEvent) {
        let Some(t) = &e.trial else { return };
        let before = self.trials.insert(t.trial_id.clone(), t.clone()).map(|b| b.state);
        let label = output::trial_label(t);
        // An epoch computed once for several trials, or by an earlier sweep, says so on its
        // line, not as a note.
        let tag = |s: &str| s.starts_with("shared with ") || s.starts_with("reused from ");
        let (shared, note) = match e.note.split_once("; ") {
            _ if e.metrics.is_none() => ("", e.note.as_str()),
            Some((first, rest)) if tag(first) => (first, rest),
            None if tag(&e.note) => (e.note.as_str(), ""),
            _ => ("", e.note.as_str()),
        };
        if e.metrics.is_some() || is_final(&t.state) {
            self.pretraining.remove(&t.trial_id);
        }
        // Only the coordinator's own notes of progress (an event without metrics), and only
        // values that hold together: a worker's free-text note on a report could look like one.
        let progress = e
            .metrics
            .is_none()
            .then(|| sweep_core::records::PretrainProgress::parse(note))
            .flatten()
            .filter(|p| p.check().is_ok());
        if let Some(p) = progress {
            // Pretraining, as it goes: a line of its own, and the trial's bar says so.
            self.say(&format!("{}  {note}", t.trial_id));
            if let Some(bar) = self.live.as_ref().and_then(|l| l.bars.get(&t.trial_id)) {
                bar.set_message(if p.waiting {
                    format!("waiting for {}'s pretraining", p.backbone.name())
                } else {
                    format!("pretraining {} {}/{}", p.backbone.name(), p.epoch, p.epochs)
                });
            }
            self.pretraining.insert(t.trial_id.clone(), p);
            self.refresh_header();
            return;
        }
        if !note.is_empty() {
            self.say(&format!("{}  note: {note}", t.trial_id));
        }
        if let Some(m) = &e.metrics {
            // Epochs an earlier sweep computed take no time here (the estimate of what is left
            // counts the epochs this sweep computes).
            if !shared.starts_with("reused from ") {
                self.epoch_seconds.0 += m.seconds;
                self.epoch_seconds.1 += 1;
            }
            if self.live.is_none() {
                self.say(&format!(
                    "{}  epoch {}/{} {:<18} train loss {:.3} acc {:>6}  val loss {:.3} acc {:>6}  ({:.1}s){}",
                    t.trial_id,
                    m.epoch,
                    t.fe_epochs + t.ft_epochs,
                    m.phase,
                    m.train_loss,
                    output::percent(Some(m.train_accuracy)),
                    m.val_loss,
                    output::percent(Some(m.val_accuracy)),
                    m.seconds,
                    if shared.is_empty() { String::new() } else { format!("  [{shared}]") }
                ));
            }
        } else {
            let changed = before.as_deref() != Some(t.state.as_str());
            let counts = self.counts_line();
            match TrialState::parse(&t.state) {
                Some(TrialState::Running) if changed => {
                    self.say(&format!("{label}  started on {} (attempt {})", t.worker_id, t.attempts))
                }
                Some(TrialState::Completed) => self.say(&format!("{label}  completed: {}  [{counts}]", accuracies(t))),
                Some(TrialState::Stopped) => {
                    self.say(&format!("{label}  stopped early, {}: {}  [{counts}]", accuracies(t), t.error))
                }
                Some(TrialState::Paused) if changed => self.say(&format!(
                    "{label}  paused at a rung, {}: waits to be promoted or stopped  [{counts}]",
                    accuracies(t)
                )),
                Some(TrialState::Failed) => self.say(&format!("{label}  FAILED: {}  [{counts}]", t.error)),
                Some(TrialState::Cancelled) => self.say(&format!("{label}  cancelled  [{counts}]")),
                Some(TrialState::Unschedulable) if changed => self.say(&format!("{label}  unschedulable: {}", t.error)),
                Some(TrialState::Pending) if !t.error.is_empty() => {
                    self.say(&format!("{label}  attempt {} ended: {}; queued again", t.attempts, t.error))
                }
                _ => {}
            }
        }
        self.bar_for(t);
        self.refresh_header();
    }

    /// The sweep reached a final state.
    pub fn end(&mut self, s: &v1::SweepSummary) {
        if let Some(l) = self.live.take() {
            for b in l.bars.values() {
                b.finish_and_clear();
            }
            l.header.finish_and_clear();
            let _ = l.multi.clear();
        }
        self.ended = Some(s.clone());
        self.say(&format!("sweep {} {}: {}", s.id, s.state, output::counts_line(s)));
    }

    /// Applies one event of a stream; `resumed` when the stream continues after a break.
    /// The snapshot of a sweep that had already ended when a first stream opened ends the view
    /// too (the coordinator sends nothing after it).
    pub fn apply(&mut self, event: &v1::SweepEvent, resumed: bool) {
        if self.json {
            println!("{}", output::event_json(event));
            match &event.event {
                Some(v1::sweep_event::Event::Snapshot(s)) if !resumed => {
                    self.ended = s.sweep.clone().filter(|sw| is_final(&sw.state));
                }
                Some(v1::sweep_event::Event::Ended(s)) => self.ended = Some(s.clone()),
                _ => {}
            }
            return;
        }
        match &event.event {
            Some(v1::sweep_event::Event::Snapshot(s)) => {
                self.snapshot(s, resumed);
                if let Some(sw) = s.sweep.as_ref().filter(|sw| !resumed && is_final(&sw.state)) {
                    self.end(sw);
                }
            }
            Some(v1::sweep_event::Event::Trial(t)) => self.trial(t),
            Some(v1::sweep_event::Event::Ended(s)) => self.end(s),
            None => {}
        }
    }
}

/// How long [`follow`] keeps trying to reconnect before it gives up.
pub const RECONNECT_FOR: Duration = Duration::from_secs(300);

/// Follows sweep `id` until it ends, reconnecting (from the last sequence seen) when the stream
/// breaks; returns the final summary. `on_tick` runs every second (e.g. to check local worker
/// processes) and may end the wait with an error.
pub async fn follow(
    client: &mut Client,
    id: &str,
    view: &mut View,
    mut on_tick: impl FnMut(&View) -> anyhow::Result<()>,
) -> anyhow::Result<v1::SweepSummary> {
    let mut last = 0u64;
    let mut broken_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        if broken_since.is_some() {
            // Never a tight loop: a stream that keeps breaking is retried once a second.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut stream = match client.watch(id, last).await {
            Ok(s) => s,
            Err(e) => {
                let since = *broken_since.get_or_insert_with(Instant::now);
                if last == 0 || since.elapsed() > RECONNECT_FOR {
                    return Err(e);
                }
                continue;
            }
        };
        if broken_since.take().is_some() {
            view.say(&format!("reconnected; following from event {last}"));
        }
        let resumed = last > 0;
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(event)) => {
                        // A snapshot's sequence is the newest in the store, not the last event
                        // shown: a stream that breaks during the replay after it must resume
                        // from the last event actually seen.
                        if !matches!(event.event, Some(v1::sweep_event::Event::Snapshot(_))) {
                            last = last.max(event.sequence);
                        }
                        view.apply(&event, resumed);
                        if let Some(s) = view.ended() {
                            return Ok(s.clone());
                        }
                    }
                    Ok(None) => {
                        view.say("the coordinator closed the event stream; reconnecting");
                        broken_since = Some(Instant::now());
                        break;
                    }
                    Err(s) => {
                        if matches!(
                            s.code(),
                            tonic::Code::NotFound
                                | tonic::Code::Unauthenticated
                                | tonic::Code::PermissionDenied
                                | tonic::Code::InvalidArgument
                                // A damaged state: asking again gives the same answer.
                                | tonic::Code::DataLoss
                        ) {
                            bail!("{}", s.message());
                        }
                        view.say(&format!("event stream broken ({}); reconnecting", s.message()));
                        broken_since = Some(Instant::now());
                        break;
                    }
                },
                _ = tick.tick() => on_tick(view)?,
            }
        }
    }
}

/// A trial's accuracies as the end of its line says them: the best during fine-tuning (what
/// the leaderboard ranks by) and the newest epoch's, each named.
fn accuracies(t: &v1::TrialSummary) -> String {
    match (t.best_val_accuracy, t.latest_val_accuracy) {
        (Some(best), Some(last)) if best != last => {
            format!("best ft val {}, last {}", output::percent(Some(best)), output::percent(Some(last)))
        }
        (Some(best), _) => format!("best ft val {}", output::percent(Some(best))),
        (None, last) => format!("last val {}", output::percent(last)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(id: &str, state: &str, done: u32) -> v1::TrialSummary {
        v1::TrialSummary {
            trial_id: id.into(),
            backbone: "resnet18".into(),
            fe_epochs: 2,
            ft_epochs: 2,
            state: state.into(),
            epochs_done: done,
            ..Default::default()
        }
    }

    #[test]
    fn a_trials_line_names_its_best_and_its_last_accuracy() {
        let mut t = trial("t000", "completed", 4);
        t.latest_val_accuracy = Some(0.733);
        assert_eq!(accuracies(&t), "last val 73.3%");
        t.best_val_accuracy = Some(0.867);
        assert_eq!(accuracies(&t), "best ft val 86.7%, last 73.3%");
        t.latest_val_accuracy = Some(0.867);
        assert_eq!(accuracies(&t), "best ft val 86.7%");
    }

    #[test]
    fn counts_and_eta_follow_the_events() {
        let mut v = View::new(Stream::Stdout, false);
        assert!(!v.is_live());
        v.snapshot(
            &v1::SweepStatus {
                sweep: Some(v1::SweepSummary { id: "s-1".into(), ..Default::default() }),
                trials: vec![trial("t000", "running", 1), trial("t001", "pending", 0), trial("t002", "completed", 4)],
                ..Default::default()
            },
            false,
        );
        assert_eq!(v.counts_line(), "1/3 completed, 1 running, 1 pending");
        assert_eq!(v.eta_seconds(), None);
        v.trial(&v1::TrialEvent {
            trial: Some(trial("t000", "running", 2)),
            metrics: Some(v1::EpochMetrics { epoch: 2, seconds: 10.0, ..Default::default() }),
            note: String::new(),
        });
        // 2 epochs left of t000 and 4 of t001, 10 s each, one at a time.
        assert_eq!(v.eta_seconds(), Some(60.0));
        v.trial(&v1::TrialEvent { trial: Some(trial("t001", "running", 0)), metrics: None, note: String::new() });
        assert_eq!(v.eta_seconds(), Some(30.0));
        // t001 pretrains its backbone first: 1 of 3 epochs in 10 s, so 20 s more, counted.
        v.trial(&v1::TrialEvent {
            trial: Some(trial("t001", "running", 0)),
            metrics: None,
            note: "pretraining resnet18: 1/3 epochs, 10.0 s".into(),
        });
        assert_eq!(v.pretraining_left(), Some(20.0));
        assert_eq!(v.eta_seconds(), Some(50.0));
        // Its first epoch: pretraining is over.
        v.trial(&v1::TrialEvent {
            trial: Some(trial("t001", "running", 1)),
            metrics: Some(v1::EpochMetrics { epoch: 1, seconds: 10.0, ..Default::default() }),
            note: String::new(),
        });
        assert_eq!(v.pretraining_left(), None);
        assert!(v.ended().is_none());
        v.end(&v1::SweepSummary { id: "s-1".into(), state: "completed".into(), ..Default::default() });
        assert_eq!(v.ended().unwrap().state, "completed");
    }
}
