//! `sweep gc`: removes the checkpoint files that no kept sweep references from the artifact
//! store, and `sweep drop`, which stops keeping a sweep.
//!
//! The coordinator knows every reference (`ListReferences`: the checkpoints each kept sweep's
//! trials hold and the stage points later sweeps may start from, wherever they point); the
//! artifact store holds the files. For each sweep whose trials have all ended (nothing writes
//! to its folders any more), every checkpoint file in its trial folders that no kept sweep
//! references — superseded attempts' weights, resume points no stage needs, and everything of
//! a dropped sweep that no other sweep reuses — is removed, with the JSON beside it. Files a
//! kept sweep references are never touched, even in a dropped sweep's folders, and nothing that
//! is not a checkpoint file of a trial folder is looked at.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;
use sweep_artifacts::ArtifactStore;
use sweep_proto::v1;

use crate::client::Client;
use crate::output::{self, Format};

/// Files written less than this long before `gc` started (by the store's clock) are left alone
/// by default: a sweep reopened by `sweep retry` while `gc` runs may be writing them, and the
/// store's clock may differ from this machine's.
pub const MIN_AGE_SECONDS: u64 = 600;

/// What `sweep gc` did (or, with `--dry-run`, would do) in one sweep's folders.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Collected {
    pub sweep_id: String,
    /// Why its folders were left alone (trials still waiting or running).
    pub skipped: Option<String>,
    /// Keys removed, and their bytes.
    pub removed: Vec<(String, u64)>,
    /// Checkpoint files kept (referenced).
    pub kept: usize,
}

/// Whether `file` (the last part of a key) is a checkpoint file a worker writes into a trial
/// folder: `last`, `best`, a shared epoch's `last-e…-a…`, a resume point `state-e…`, as
/// `.safetensors` or the `.json` beside it.
fn is_checkpoint_file(file: &str) -> bool {
    let Some(stem) = file.strip_suffix(".safetensors").or_else(|| file.strip_suffix(".json")) else {
        return false;
    };
    stem == "last" || stem == "best" || stem.starts_with("last-e") || stem.starts_with("state-e")
}

/// Collects the folders of `sweeps` (every sweep the coordinator knows when empty) in the
/// artifact store at `location`; files younger than `min_age_seconds` stay.
pub async fn gc(
    client: &mut Client,
    location: &str,
    sweeps: &[String],
    min_age_seconds: u64,
    dry_run: bool,
) -> anyhow::Result<Vec<Collected>> {
    let local = !location.contains("://") || location.starts_with("file://");
    if local {
        let dir = PathBuf::from(location.strip_prefix("file://").unwrap_or(location));
        anyhow::ensure!(dir.is_dir(), "no artifact store at {}: not a directory", dir.display());
    }
    let scratch = std::env::temp_dir().join(format!("sweep-gc-{}", std::process::id()));
    let store = ArtifactStore::open(location, &scratch, tokio::runtime::Handle::current())?;
    let ids: Vec<String> = if sweeps.is_empty() {
        client.list_all(None).await?.into_iter().map(|s| s.id).collect()
    } else {
        sweeps.to_vec()
    };
    let started_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let mut out = Vec::new();
    for id in ids {
        let refs = client
            .raw()
            .list_references(v1::ListReferencesRequest { sweep_id: id.clone() })
            .await
            .with_context(|| format!("references of sweep {id}"))?
            .into_inner();
        // Ids become parts of keys: only what a coordinator makes, and the sweep asked about.
        let asked = &id;
        anyhow::ensure!(
            sweep_core::grid::is_sweep_id(&refs.sweep_id)
                && (refs.sweep_id == *asked || refs.sweep_id.starts_with(asked.as_str())),
            "the coordinator answered for sweep `{}` when asked about `{}`; nothing was removed from it",
            refs.sweep_id.escape_debug(),
            asked.escape_debug()
        );
        let mut done = Collected { sweep_id: refs.sweep_id.clone(), ..Collected::default() };
        if !refs.collectable {
            done.skipped = Some(refs.reason);
            out.push(done);
            continue;
        }
        let keep: BTreeSet<&str> = refs.keys.iter().map(String::as_str).collect();
        let status = client
            .raw()
            .get_sweep(v1::GetSweepRequest { sweep_id: refs.sweep_id.clone() })
            .await
            .with_context(|| format!("sweep {}", refs.sweep_id))?
            .into_inner();
        for trial in &status.trials {
            if sweep_core::grid::trial_index(&trial.trial_id).is_none() {
                anyhow::bail!(
                    "sweep {} lists a trial `{}`, which is no trial id",
                    refs.sweep_id,
                    trial.trial_id.escape_debug()
                );
            }
            let folder = format!("{}/{}", refs.sweep_id, trial.trial_id);
            for listed in store.list(&folder).await? {
                let file = listed.key.rsplit('/').next().unwrap_or_default();
                if !is_checkpoint_file(file) {
                    continue;
                }
                // A JSON file goes with its weights (or resume point).
                let weights = match listed.key.strip_suffix(".json") {
                    Some(stem) => format!("{stem}.safetensors"),
                    None => listed.key.clone(),
                };
                if keep.contains(weights.as_str())
                    || listed.modified_ms > started_ms.saturating_sub(min_age_seconds.saturating_mul(1000) as i64)
                {
                    done.kept += 1;
                    continue;
                }
                if !dry_run {
                    store.delete(&listed.key).await?;
                }
                done.removed.push((listed.key, listed.bytes));
            }
        }
        out.push(done);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(out)
}

/// Prints what `gc` did.
pub fn print(collected: &[Collected], dry_run: bool, format: Format) {
    let verb = if dry_run { "would remove" } else { "removed" };
    match format {
        Format::Json => {
            let sweeps: Vec<_> = collected
                .iter()
                .map(|c| {
                    json!({
                        "sweep": c.sweep_id,
                        "skipped": c.skipped,
                        "removed": c.removed.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                        "removed_bytes": c.removed.iter().map(|(_, b)| b).sum::<u64>(),
                        "kept": c.kept,
                    })
                })
                .collect();
            println!("{}", json!({ "dry_run": dry_run, "sweeps": sweeps }));
        }
        Format::Table => {
            for c in collected {
                match &c.skipped {
                    Some(why) => output::print(&format!("{}: left alone ({why})", c.sweep_id)),
                    None => output::print(&format!(
                        "{}: {verb} {} files ({}), kept {} referenced",
                        c.sweep_id,
                        c.removed.len(),
                        output::bytes(c.removed.iter().map(|(_, b)| b).sum()),
                        c.kept
                    )),
                }
            }
            let files: usize = collected.iter().map(|c| c.removed.len()).sum();
            let bytes: u64 = collected.iter().flat_map(|c| &c.removed).map(|(_, b)| b).sum();
            output::print(&format!("{verb} {files} files, {} in all", output::bytes(bytes)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_checkpoint_file;

    #[test]
    fn only_checkpoint_files_are_candidates() {
        for f in ["last.safetensors", "best.json", "last-e0003-a12.safetensors", "state-e0002.json"] {
            assert!(is_checkpoint_file(f), "{f}");
        }
        for f in ["notes.txt", "last", "model.safetensors", "state.txt", ".json"] {
            assert!(!is_checkpoint_file(f), "{f}");
        }
    }
}
