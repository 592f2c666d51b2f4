//! The client side of the `sweep` CLI: reading specs, talking to a coordinator, printing.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use sweep_core::spec::{self, GridAdditions, ParseOptions, SpecError, extend_grid};
use sweep_core::state::SweepState;
use sweep_proto::v1;
use sweep_proto::v1::sweep_service_client::SweepServiceClient;
use sweep_session::connect::{BearerToken, ClientSecurity};
use tonic::service::interceptor::InterceptedService;

use crate::output::{self, Format, TableFormat};
use crate::watch;

/// Where the CLI looks for a coordinator unless told otherwise.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

/// Reads a spec file, with an error that names it.
pub fn read_spec(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read spec {}", path.display()))
}

/// `FILE:LINE:COLUMN: field: message`, the form editors and terminals link to.
pub fn spec_error(path: &Path, e: &SpecError) -> anyhow::Error {
    let field = if e.field.is_empty() { String::new() } else { format!("{}: ", e.field) };
    anyhow!("{}:{}:{}: {field}{}", path.display(), e.line, e.column, e.message)
}

/// Reads and validates a spec.
pub fn load_spec(path: &Path, options: ParseOptions) -> anyhow::Result<(String, spec::SweepSpec)> {
    let text = read_spec(path)?;
    let parsed = spec::parse_with(&text, options).map_err(|e| spec_error(path, &e))?;
    Ok((text, parsed))
}

/// `sweep validate`.
/// Tags and a note given with a submission (`--tag`, `--note`).
#[derive(Debug, Clone, Default)]
pub struct Labels {
    pub tags: Vec<String>,
    pub note: String,
}

impl Labels {
    /// The rules the coordinator applies, checked before anything is sent.
    pub fn check(&self) -> anyhow::Result<()> {
        // Each tag and their number, as the coordinator's `retag` checks them.
        sweep_core::records::retag(&[], &self.tags, &[]).map_err(|e| anyhow!(e))?;
        sweep_core::records::check_note(&self.note).map_err(|e| anyhow!(e))
    }
}

/// `sweep validate`: the trials, then the resolved spec (every default filled in); with
/// `resolved_only`, the resolved spec alone (YAML, whatever the format).
pub fn validate(path: &Path, max_trials: usize, format: Format, resolved_only: bool) -> anyhow::Result<ExitCode> {
    let (_, parsed) = load_spec(path, ParseOptions::with_max_trials(max_trials))?;
    let trials = sweep_core::grid::expand(&parsed.grid);
    let resolved = spec::resolved_yaml(&parsed);
    if resolved_only {
        output::print(resolved.trim_end());
        return Ok(ExitCode::SUCCESS);
    }
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "name": parsed.name,
                "dataset": parsed.dataset.kind(),
                "trial_count": trials.len(),
                "trials": output::trials_json(&trials),
                "resolved_spec": resolved,
            }))?
        ),
        Format::Table => {
            output::print(&format!(
                "{}: valid; sweep `{}`, {} trials\n\n{}\n\nThe spec as it will run, every default filled in (`--resolved` prints it alone):\n\n{}",
                path.display(),
                parsed.name,
                trials.len(),
                output::trials_table(&trials),
                resolved.trim_end()
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

type Channel = InterceptedService<tonic::transport::Channel, BearerToken>;

/// Rows asked for per page of `ListSweeps` and `ListWorkers`.
const PAGE: u32 = 500;
/// Most rows a list command reads in all (a server that pages on forever is not followed).
const MAX_LISTED: usize = 1_000_000;

/// A connected client of `SweepService`.
pub struct Client {
    inner: SweepServiceClient<Channel>,
    url: String,
}

fn status_error(url: &str, s: tonic::Status) -> anyhow::Error {
    // A transport failure (a TLS handshake the server ended, a reset) says only "transport
    // error"; its causes say what happened.
    let mut causes = String::new();
    let mut source = std::error::Error::source(&s);
    while let Some(e) = source {
        causes.push_str(&format!(": {e}"));
        source = e.source();
    }
    if !causes.is_empty() {
        return anyhow!("the call to {url} failed: {}{causes}", s.message());
    }
    match s.code() {
        tonic::Code::Unavailable => anyhow!("coordinator at {url} is unavailable: {}", s.message()),
        tonic::Code::Unauthenticated => anyhow!("{url} refused the call: {}", s.message()),
        tonic::Code::PermissionDenied => anyhow!("{url} refused the call: {}", s.message()),
        _ => anyhow!("{}", s.message()),
    }
}

impl Client {
    /// Connects without TLS settings or a token (a loopback coordinator).
    pub async fn connect(url: &str) -> anyhow::Result<Client> {
        Client::connect_with(url, &ClientSecurity::default()).await
    }

    /// Connects with TLS (for `https://`) and the bearer token of `security`.
    pub async fn connect_with(url: &str, security: &ClientSecurity) -> anyhow::Result<Client> {
        let endpoint = security.endpoint(url)?.connect_timeout(Duration::from_secs(5));
        let channel = endpoint.connect().await.map_err(|e| {
            let cause = std::error::Error::source(&e).map(|s| format!(" ({s})")).unwrap_or_default();
            let hint = if cause.contains("certificate") {
                "give --ca-cert with the CA that signed the coordinator's certificate (and --client-cert and --client-key if it asks for one)"
            } else {
                "start one with `sweep coordinator`, or point to it with --coordinator or SWEEP_COORDINATOR"
            };
            anyhow!("cannot reach the coordinator at {url}: {e}{cause}; {hint}")
        })?;
        let inner =
            SweepServiceClient::with_interceptor(channel, security.interceptor()).max_decoding_message_size(64 << 20);
        Ok(Client { inner, url: url.to_string() })
    }

    pub fn raw(&mut self) -> &mut SweepServiceClient<Channel> {
        &mut self.inner
    }

    pub async fn submit_text(&mut self, text: String, source: String) -> anyhow::Result<v1::SubmitSweepResponse> {
        self.submit_labelled(text, source, &Labels::default()).await
    }

    /// Submits a spec's text with tags and a note.
    pub async fn submit_labelled(
        &mut self,
        text: String,
        source: String,
        labels: &Labels,
    ) -> anyhow::Result<v1::SubmitSweepResponse> {
        labels.check()?;
        let request =
            v1::SubmitSweepRequest { spec_yaml: text, source, tags: labels.tags.clone(), note: labels.note.clone() };
        let r = self.inner.submit_sweep(request).await.map_err(|s| status_error(&self.url, s))?;
        Ok(r.into_inner())
    }

    /// `sweep tag` and `sweep note`: changes a sweep's tags or note; prints what it has now.
    pub async fn update_sweep(
        &mut self,
        id: &str,
        add: &[String],
        remove: &[String],
        note: Option<String>,
        format: Format,
    ) -> anyhow::Result<()> {
        sweep_core::records::retag(&[], add, remove).map_err(|e| anyhow!(e))?;
        if let Some(n) = &note {
            sweep_core::records::check_note(n).map_err(|e| anyhow!(e))?;
        }
        let request = v1::UpdateSweepRequest {
            sweep_id: id.to_string(),
            add_tags: add.to_vec(),
            remove_tags: remove.to_vec(),
            note,
        };
        let s = self.inner.update_sweep(request).await.map_err(|s| status_error(&self.url, s))?.into_inner();
        match format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&output::sweep_json(&s))?),
            Format::Table => output::print(&output::labels_text(&s)),
        }
        Ok(())
    }

    /// `sweep submit`: validates locally first (same parser), then submits; returns the id.
    pub async fn submit(&mut self, path: &Path, format: Format, labels: &Labels) -> anyhow::Result<String> {
        let (text, _) = load_spec(path, ParseOptions::with_max_trials(usize::MAX))?;
        let r = self.submit_labelled(text, path.display().to_string(), labels).await?;
        match format {
            Format::Json => {
                println!(
                    "{}",
                    serde_json::json!({
                        "id": r.sweep_id, "trial_count": r.trial_count, "reused_epochs": r.reused_epochs,
                        "reused_trials": r.reused_trials, "reused_from": r.reused_from,
                    })
                );
            }
            Format::Table => {
                output::print(&format!("submitted {} with {} trials to {}", path.display(), r.trial_count, self.url));
                if let Some(line) = output::reused_line(&r) {
                    output::print(&line);
                }
                output::print(&r.sweep_id);
            }
        }
        Ok(r.sweep_id)
    }

    /// Every sweep, newest first, read a page at a time (or the newest `limit`).
    pub async fn list_all(&mut self, limit: Option<usize>) -> anyhow::Result<Vec<v1::SweepSummary>> {
        self.list_tagged(limit, "").await
    }

    /// Sweeps, newest first, only those tagged `tag` unless it is empty.
    pub async fn list_tagged(&mut self, limit: Option<usize>, tag: &str) -> anyhow::Result<Vec<v1::SweepSummary>> {
        if !tag.is_empty() {
            sweep_core::records::check_tag(tag).map_err(|e| anyhow!(e))?;
        }
        let mut sweeps = Vec::new();
        let mut token = String::new();
        loop {
            let page_size = limit.map_or(PAGE, |l| (l - sweeps.len()).min(PAGE as usize) as u32);
            let r = self
                .inner
                .list_sweeps(v1::ListSweepsRequest { page_size, page_token: token.clone(), tag: tag.to_string() })
                .await
                .map_err(|s| status_error(&self.url, s))?
                .into_inner();
            let empty = r.sweeps.is_empty();
            sweeps.extend(r.sweeps);
            if r.next_page_token.is_empty() || limit.is_some_and(|l| sweeps.len() >= l) {
                return Ok(sweeps);
            }
            // A server that keeps answering with more pages, but nothing new in them: not followed.
            if empty || r.next_page_token == token || sweeps.len() > MAX_LISTED {
                bail!("{} answered a page of sweeps that does not lead on; stopped after {}", self.url, sweeps.len());
            }
            token = r.next_page_token;
        }
    }

    pub async fn list(&mut self, format: Format, limit: Option<usize>, tag: &str) -> anyhow::Result<()> {
        let mut sweeps = self.list_tagged(limit, tag).await?;
        // A coordinator older than tags answers every sweep: filtered here too.
        sweeps.retain(|s| tag.is_empty() || s.tags.iter().any(|t| t == tag));
        match format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&output::sweeps_json(&sweeps))?),
            Format::Table => output::print(&output::sweeps_table(&sweeps)),
        }
        Ok(())
    }

    pub async fn get_status(&mut self, id: &str) -> anyhow::Result<v1::SweepStatus> {
        let r = self
            .inner
            .get_sweep(v1::GetSweepRequest { sweep_id: id.to_string() })
            .await
            .map_err(|s| status_error(&self.url, s))?;
        Ok(r.into_inner())
    }

    pub async fn status(&mut self, id: &str, format: Format, spec_only: bool) -> anyhow::Result<()> {
        let status = self.get_status(id).await?;
        if spec_only {
            // The stored spec as it runs (defaults filled in), as the coordinator parses it.
            let sweep = status.sweep.clone().unwrap_or_default();
            let parsed = spec::parse_with(&status.spec_yaml, ParseOptions::stored())
                .map_err(|e| anyhow::anyhow!("sweep {}: its stored spec does not parse: {e}", sweep.id))?;
            let resolved = spec::resolved_yaml(&parsed);
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "sweep": sweep.id,
                        "submitted_spec": status.spec_yaml,
                        "resolved_spec": resolved,
                    }))?
                ),
                Format::Table => output::print(resolved.trim_end()),
            }
            return Ok(());
        }
        match format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&output::status_json(&status))?),
            Format::Table => output::print(&output::status_text(&status)),
        }
        Ok(())
    }

    pub async fn get_leaderboard(&mut self, id: &str) -> anyhow::Result<v1::Leaderboard> {
        let r = self
            .inner
            .get_leaderboard(v1::GetLeaderboardRequest { sweep_id: id.to_string() })
            .await
            .map_err(|s| status_error(&self.url, s))?;
        Ok(r.into_inner())
    }

    /// `sweep leaderboard ID…`: one sweep's, or several sweeps' trials ranked together.
    pub async fn leaderboard(&mut self, ids: &[String], by: By, format: TableFormat) -> anyhow::Result<()> {
        let mut boards = Vec::with_capacity(ids.len());
        for id in ids {
            let board = self.get_leaderboard(id).await?;
            if boards.iter().any(|b: &v1::Leaderboard| b.sweep_id == board.sweep_id) {
                bail!("sweep {} is given twice", board.sweep_id);
            }
            boards.push(board);
        }
        let board = output::merge_leaderboards(boards);
        match by {
            By::Trial => print_leaderboard(&board, format),
            By::Backbone => {
                let ranks = output::by_backbone(&board);
                match format {
                    TableFormat::Json => println!("{}", serde_json::to_string_pretty(&output::backbone_json(&ranks))?),
                    TableFormat::Csv => print!("{}", output::backbone_csv(&ranks)),
                    TableFormat::Table => {
                        if ranks.is_empty() {
                            bail!("sweep {} has no trials", board.sweep_id);
                        }
                        output::print(&format!(
                            "backbones of {} ({}), each by its best trial\n{}",
                            board.sweep_id,
                            board.sweep_state,
                            output::backbone_table(&ranks)
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    pub async fn get_trial(&mut self, id: &str, trial: &str) -> anyhow::Result<v1::TrialDetail> {
        let r = self
            .inner
            .get_trial(v1::GetTrialRequest { sweep_id: id.to_string(), trial_id: trial.to_string() })
            .await
            .map_err(|s| status_error(&self.url, s))?;
        Ok(r.into_inner())
    }

    /// The sweep and every trial's detail (metrics and attempts), in trial order.
    pub async fn all_trials(&mut self, id: &str) -> anyhow::Result<(v1::SweepStatus, Vec<v1::TrialDetail>)> {
        let status = self.get_status(id).await?;
        let full_id = status.sweep.as_ref().map(|s| s.id.clone()).unwrap_or_else(|| id.to_string());
        let mut details = Vec::with_capacity(status.trials.len());
        for t in &status.trials {
            details.push(self.get_trial(&full_id, &t.trial_id).await?);
        }
        Ok((status, details))
    }

    /// `sweep export`: every per-epoch metric, to stdout or `out`.
    pub async fn export(&mut self, id: &str, format: ExportFormat, out: Option<&Path>) -> anyhow::Result<()> {
        let (status, details) = self.all_trials(id).await?;
        let full_id = status.sweep.as_ref().map(|s| s.id.clone()).unwrap_or_default();
        let text = match format {
            ExportFormat::Csv => output::export_csv(&full_id, &details),
            ExportFormat::Json => {
                format!("{}\n", serde_json::to_string_pretty(&output::export_json(&status, &details))?)
            }
        };
        match out {
            None => print!("{text}"),
            Some(path) => {
                write_new(path, text.as_bytes())?;
                let rows: usize = details.iter().map(|d| d.metrics.len()).sum();
                output::eprint(&format!("wrote {} epochs of {} trials to {}", rows, details.len(), path.display()));
            }
        }
        Ok(())
    }

    /// `sweep plot`: the figures of a sweep as PNG files in `dir`.
    pub async fn plot(&mut self, id: &str, dir: &Path, format: Format) -> anyhow::Result<()> {
        let (status, details) = self.all_trials(id).await?;
        let full_id = status.sweep.as_ref().map(|s| s.id.clone()).unwrap_or_default();
        let board = self.get_leaderboard(&full_id).await?;
        let trials: Vec<(v1::TrialSummary, Vec<v1::EpochMetrics>)> =
            details.into_iter().filter_map(|d| Some((d.trial?, d.metrics))).collect();
        if trials.iter().all(|(_, m)| m.is_empty()) {
            bail!("sweep {full_id} has no finished epochs yet: nothing to plot");
        }
        // Chance level where the spec tells the class count.
        let chance = spec::parse_with(&status.spec_yaml, ParseOptions::stored()).ok().and_then(|s| match s.dataset {
            spec::DatasetSpec::Synthetic { classes, .. } => Some(1.0 / f64::from(classes.max(1))),
            spec::DatasetSpec::Flowers102 { .. } => Some(1.0 / 102.0),
            spec::DatasetSpec::ImageFolder { .. } => None,
        });
        let dir = dir.to_path_buf();
        let written =
            tokio::task::spawn_blocking(move || crate::plot::write_all(&dir, &board, &trials, chance)).await??;
        match format {
            Format::Json => println!(
                "{}",
                serde_json::json!({"files": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()})
            ),
            Format::Table => {
                for p in &written {
                    output::print(&p.display().to_string());
                }
            }
        }
        Ok(())
    }

    /// `sweep watch`: follows the sweep until it ends; exit status 0 when it completed, 1 when
    /// it failed or was cancelled. JSON: one object per event, a line each.
    pub async fn watch_sweep(&mut self, id: &str, format: Format) -> anyhow::Result<ExitCode> {
        let status = self.get_status(id).await?;
        let full_id = status.sweep.map(|s| s.id).unwrap_or_else(|| id.to_string());
        let mut view = match format {
            Format::Json => watch::View::json(),
            Format::Table => watch::View::new(watch::Stream::Stdout, true),
        };
        let summary = watch::follow(self, &full_id, &mut view, |_| Ok(())).await?;
        let completed = SweepState::parse(&summary.state) == Some(SweepState::Completed);
        Ok(if completed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    }

    /// `sweep best`: the top trial's best checkpoint (the leaderboard's first trial that has
    /// one: completed trials rank before stopped ones).
    pub async fn best(&mut self, id: &str, format: Format) -> anyhow::Result<()> {
        let board = self.get_leaderboard(id).await?;
        let Some(e) = board.entries.iter().find(|e| e.best_checkpoint.is_some()) else {
            bail!("no trial of sweep {} has a best checkpoint yet ({})", board.sweep_id, board.sweep_state);
        };
        let c = e.best_checkpoint.as_ref().expect("found with one");
        match format {
            Format::Json => {
                let entry = output::leaderboard_json(&v1::Leaderboard { entries: vec![e.clone()], ..board.clone() });
                println!("{}", serde_json::to_string_pretty(&entry[0])?);
            }
            Format::Table => println!("{}", output::terminal(&c.uri)),
        }
        if e.rank != 1 {
            output::eprint(&format!(
                "note: the top trial has no best checkpoint yet; this is rank {}'s ({})",
                e.rank, e.trial_id
            ));
        }
        Ok(())
    }

    pub async fn trial(&mut self, id: &str, trial: &str, format: Format) -> anyhow::Result<()> {
        let d = self.get_trial(id, trial).await?;
        match format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&output::trial_detail_json(&d))?),
            Format::Table => output::print(&output::trial_detail_text(&d)),
        }
        Ok(())
    }

    pub async fn cancel(&mut self, id: &str, format: Format) -> anyhow::Result<()> {
        let r = self
            .inner
            .cancel_sweep(v1::CancelSweepRequest { sweep_id: id.to_string() })
            .await
            .map_err(|s| status_error(&self.url, s))?
            .into_inner();
        match format {
            Format::Json => println!(
                "{}",
                serde_json::json!({"cancelled_pending": r.cancelled_pending, "stopping_running": r.stopping_running})
            ),
            Format::Table => println!(
                "cancelled {} pending trials; asked workers to stop {} running ones",
                r.cancelled_pending, r.stopping_running
            ),
        }
        Ok(())
    }

    pub async fn retry(&mut self, id: &str, trial_ids: Vec<String>, format: Format) -> anyhow::Result<()> {
        let r = self
            .inner
            .retry_sweep(v1::RetrySweepRequest { sweep_id: id.to_string(), trial_ids })
            .await
            .map_err(|s| status_error(&self.url, s))?
            .into_inner();
        match format {
            Format::Json => println!("{}", serde_json::json!({ "requeued": r.trial_ids })),
            Format::Table if r.trial_ids.is_empty() => println!("no failed trials to retry"),
            Format::Table => {
                output::print(&format!("re-queued {} trial(s): {}", r.trial_ids.len(), r.trial_ids.join(", ")))
            }
        }
        Ok(())
    }

    /// `sweep extend`: submits sweep `id`'s spec with more grid values, as a new sweep. Its
    /// trials start from the stages the coordinator has stored (every trial of `id` that is
    /// done, whole; the new ones from the longest run of first epochs they share with a stored
    /// one), so only what is new is computed. Returns the new sweep's id.
    pub async fn extend(&mut self, id: &str, add: &GridAdditions, format: Format) -> anyhow::Result<String> {
        let status = self
            .inner
            .get_sweep(v1::GetSweepRequest { sweep_id: id.to_string() })
            .await
            .map_err(|s| status_error(&self.url, s))?
            .into_inner();
        let old = status.sweep.as_ref().map(|s| s.id.clone()).unwrap_or_else(|| id.to_string());
        let (text, spec) = extend_grid(&status.spec_yaml, add, ParseOptions::with_max_trials(usize::MAX))
            .map_err(|e| anyhow::anyhow!("sweep {old}: {e}"))?;
        if !spec.sharing {
            anyhow::bail!(
                "sweep {old} has `sharing: off`: its trials share nothing, with each other or with other sweeps, so an \
                 extension would compute everything again; submit a spec with `sharing: on` instead"
            );
        }
        let r = self.submit_text(text, format!("sweep extend {old}")).await?;
        match format {
            Format::Json => println!(
                "{}",
                serde_json::json!({
                    "id": r.sweep_id, "extends": old, "trial_count": r.trial_count, "reused_epochs": r.reused_epochs,
                    "reused_trials": r.reused_trials, "reused_from": r.reused_from,
                })
            ),
            Format::Table => {
                let before = status.trials.len();
                output::print(&format!(
                    "extended {old}: {} trials ({} new) to {}",
                    r.trial_count,
                    (r.trial_count as usize).saturating_sub(before),
                    self.url
                ));
                match output::reused_line(&r) {
                    Some(line) => output::print(&line),
                    None => output::print(&format!("nothing of {old} is stored yet: every trial is computed")),
                }
                output::print(&r.sweep_id);
            }
        }
        Ok(r.sweep_id)
    }

    /// `sweep drop`: stops keeping an ended sweep.
    pub async fn drop_sweep(&mut self, id: &str, format: Format) -> anyhow::Result<()> {
        let r = self
            .inner
            .drop_sweep(v1::DropSweepRequest { sweep_id: id.to_string() })
            .await
            .map_err(|s| status_error(&self.url, s))?
            .into_inner();
        match format {
            Format::Json => {
                println!("{}", serde_json::json!({ "dropped": r.sweep_id, "stage_points": r.stage_points }))
            }
            Format::Table => output::print(&format!(
                "dropped {}: later sweeps no longer start from its {} stored stage points; `sweep gc` may remove its \
                 files that no kept sweep references",
                r.sweep_id, r.stage_points
            )),
        }
        Ok(())
    }

    /// Every registered worker, read a page at a time.
    pub async fn workers_all(&mut self) -> anyhow::Result<Vec<v1::WorkerInfo>> {
        let mut workers = Vec::new();
        let mut token = String::new();
        loop {
            let r = self
                .inner
                .list_workers(v1::ListWorkersRequest { page_size: PAGE, page_token: token.clone() })
                .await
                .map_err(|s| status_error(&self.url, s))?
                .into_inner();
            let empty = r.workers.is_empty();
            workers.extend(r.workers);
            if r.next_page_token.is_empty() {
                return Ok(workers);
            }
            if empty || r.next_page_token == token || workers.len() > MAX_LISTED {
                bail!("{} answered a page of workers that does not lead on; stopped after {}", self.url, workers.len());
            }
            token = r.next_page_token;
        }
    }

    pub async fn workers(&mut self, format: Format) -> anyhow::Result<()> {
        let workers = self.workers_all().await?;
        match format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&output::workers_json(&workers))?),
            Format::Table => output::print(&output::workers_table(&workers)),
        }
        Ok(())
    }

    /// Opens the event stream of a sweep.
    pub async fn watch(&mut self, id: &str, after: u64) -> anyhow::Result<tonic::Streaming<v1::SweepEvent>> {
        let r = self
            .inner
            .watch_sweep(v1::WatchSweepRequest { sweep_id: id.to_string(), after_sequence: after })
            .await
            .map_err(|s| status_error(&self.url, s))?;
        Ok(r.into_inner())
    }
}

/// `leaderboard --by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    /// One row per trial.
    Trial,
    /// One row per backbone: its best trial, and what all its trials cost.
    Backbone,
}

/// `export --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Csv,
    Json,
}

/// Writes `bytes` to `path` (through a temporary file and a rename, so that an interrupted
/// write never leaves half a file where a whole one was).
pub fn write_new(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

pub fn print_leaderboard(board: &v1::Leaderboard, format: TableFormat) -> anyhow::Result<()> {
    match format {
        TableFormat::Json => println!("{}", serde_json::to_string_pretty(&output::leaderboard_json(board))?),
        TableFormat::Csv => print!("{}", output::leaderboard_csv(board)),
        TableFormat::Table => {
            if board.entries.is_empty() {
                bail!("sweep {} has no trials", board.sweep_id);
            }
            output::print(&format!(
                "leaderboard of {} ({})\n{}",
                board.sweep_id,
                board.sweep_state,
                output::leaderboard_table(board)
            ));
        }
    }
    Ok(())
}
