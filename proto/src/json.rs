//! The JSON forms of the `sweep.v1` messages: what `sweep … --output json` prints and what the
//! coordinator's dashboard API answers, one shape for both (documented in README.md). Field
//! names only ever get added, never renamed or removed.

use serde_json::{Value, json};

use crate::v1;

pub fn lr_json(d: Option<&v1::LrDecay>) -> Value {
    match d {
        Some(d) if d.strategy == "linear" => {
            json!({"strategy": "linear", "head_lr": d.head_lr, "final_lr": d.final_lr})
        }
        Some(d) if d.strategy == "exponential" => {
            json!({"strategy": "exponential", "head_lr": d.head_lr, "factor": d.factor})
        }
        Some(d) => json!({"strategy": d.strategy}),
        None => Value::Null,
    }
}

pub fn checkpoint_json(c: Option<&v1::CheckpointRef>) -> Value {
    match c {
        Some(c) => json!({"uri": c.uri, "epoch": c.epoch, "sha256": c.sha256, "bytes": c.bytes}),
        None => Value::Null,
    }
}

pub fn time_json(ms: i64) -> Value {
    if ms == 0 { Value::Null } else { json!(ms) }
}

pub fn counts_json(c: Option<&v1::TrialCounts>) -> Value {
    let c = c.cloned().unwrap_or_default();
    Value::Object(c.by_state().map(|(state, n)| (state.as_str().to_string(), json!(n))).collect())
}

pub fn sweep_json(s: &v1::SweepSummary) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "state": s.state,
        "trial_count": s.trial_count,
        "counts": counts_json(s.counts.as_ref()),
        "source": s.source,
        "created_at_ms": s.created_at_ms,
        "finished_at_ms": time_json(s.finished_at_ms),
        "dropped_at_ms": time_json(s.dropped_at_ms),
        "tags": s.tags,
        "note": if s.note.is_empty() { Value::Null } else { json!(s.note) },
    })
}

pub fn sweeps_json(sweeps: &[v1::SweepSummary]) -> Value {
    Value::Array(sweeps.iter().map(sweep_json).collect())
}

pub fn trial_json(t: &v1::TrialSummary) -> Value {
    json!({
        "trial": t.trial_id,
        "backbone": t.backbone,
        "lr_decay": lr_json(t.lr_decay.as_ref()),
        "epoch_split": [t.fe_epochs, t.ft_epochs],
        "state": t.state,
        "epochs_done": t.epochs_done,
        "latest_val_accuracy": t.latest_val_accuracy,
        "best_val_accuracy": t.best_val_accuracy,
        "attempts": t.attempts,
        "worker": if t.worker_id.is_empty() { Value::Null } else { json!(t.worker_id) },
        "devices": t.devices,
        "error": if t.error.is_empty() { Value::Null } else { json!(t.error) },
        "started_at_ms": time_json(t.started_at_ms),
        "finished_at_ms": time_json(t.finished_at_ms),
    })
}

pub fn status_json(status: &v1::SweepStatus) -> Value {
    let mut v = status.sweep.as_ref().map(sweep_json).unwrap_or_else(|| json!({}));
    v["trials"] = Value::Array(status.trials.iter().map(trial_json).collect());
    v
}

pub fn leaderboard_json(board: &v1::Leaderboard) -> Value {
    Value::Array(
        board
            .entries
            .iter()
            .map(|e| {
                json!({
                    "sweep": if e.sweep_id.is_empty() { &board.sweep_id } else { &e.sweep_id },
                    "rank": e.rank,
                    "trial": e.trial_id,
                    "backbone": e.backbone,
                    "lr_decay": lr_json(e.lr_decay.as_ref()),
                    "epoch_split": [e.fe_epochs, e.ft_epochs],
                    "state": e.state,
                    "fe_val_accuracy": e.fe_val_accuracy,
                    "best_val_accuracy": e.best_val_accuracy,
                    "best_epoch": e.best_epoch,
                    "parameters": e.parameters,
                    "wall_seconds": e.wall_seconds,
                    "checkpoints": {
                        "best": checkpoint_json(e.best_checkpoint.as_ref()),
                        "last": checkpoint_json(e.last_checkpoint.as_ref()),
                    },
                    "skipped_images": e.skipped_images,
                })
            })
            .collect(),
    )
}

/// it (metrics and attempts included).
pub fn export_json(status: &v1::SweepStatus, trials: &[v1::TrialDetail]) -> Value {
    let mut v = status.sweep.as_ref().map(sweep_json).unwrap_or_else(|| json!({}));
    v["trials"] = Value::Array(trials.iter().map(trial_detail_json).collect());
    v
}

pub fn trial_detail_json(d: &v1::TrialDetail) -> Value {
    let mut v = d.trial.as_ref().map(trial_json).unwrap_or_else(|| json!({}));
    v["parameters"] = json!(d.parameters);
    v["checkpoints"] = json!({"best": checkpoint_json(d.best_checkpoint.as_ref()), "last": checkpoint_json(d.last_checkpoint.as_ref())});
    v["skipped_images"] = json!(d.skipped_images);
    v["metrics"] = Value::Array(d.metrics.iter().map(metrics_json).collect());
    v["attempts"] = Value::Array(
        d.attempts
            .iter()
            .enumerate()
            .map(|(n, a)| {
                json!({
                    "attempt": a.attempt_id, "number": n + 1, "worker": a.worker_id, "state": a.state,
                    "started_at_ms": time_json(a.started_at_ms), "ended_at_ms": time_json(a.ended_at_ms),
                    "error": if a.error.is_empty() { Value::Null } else { json!(a.error) },
                })
            })
            .collect(),
    );
    v
}

pub fn metrics_json(m: &v1::EpochMetrics) -> Value {
    json!({
        "epoch": m.epoch, "phase": m.phase, "train_loss": m.train_loss, "train_accuracy": m.train_accuracy,
        "val_loss": m.val_loss, "val_accuracy": m.val_accuracy, "seconds": m.seconds,
        "shared_with": m.shared_with,
        "reused_from": if m.reused_from.is_empty() { Value::Null } else { json!(m.reused_from) },
    })
}

/// `sweep watch --output json`: one event, as one line.
pub fn event_json(e: &v1::SweepEvent) -> Value {
    use v1::sweep_event::Event;
    match &e.event {
        Some(Event::Snapshot(s)) => json!({"sequence": e.sequence, "type": "snapshot", "sweep": status_json(s)}),
        Some(Event::Trial(t)) => json!({
            "sequence": e.sequence,
            "type": if t.metrics.is_some() { "epoch" } else { "trial" },
            "trial": t.trial.as_ref().map(trial_json),
            "metrics": t.metrics.as_ref().map(metrics_json),
            "note": if t.note.is_empty() { Value::Null } else { json!(t.note) },
        }),
        Some(Event::Ended(s)) => json!({"sequence": e.sequence, "type": "ended", "sweep": sweep_json(s)}),
        None => json!({"sequence": e.sequence, "type": "unknown"}),
    }
}

pub fn workers_json(workers: &[v1::WorkerInfo]) -> Value {
    Value::Array(
        workers
            .iter()
            .map(|w| {
                json!({
                    "worker": w.worker_id,
                    "name": w.name,
                    "incarnation": w.incarnation,
                    "state": w.state,
                    "devices": w.devices.iter().map(|d| json!({"id": d.id, "kind": d.kind, "name": d.name, "memory_bytes": d.memory_bytes})).collect::<Vec<_>>(),
                    "running": w.running,
                    "busy": w.busy.iter().map(|u| json!({"device": u.device, "sweep": u.sweep_id, "trial": u.trial_id, "attempt": u.attempt_id})).collect::<Vec<_>>(),
                    "note": if w.note.is_empty() { Value::Null } else { json!(w.note) },
                    "registered_at_ms": w.registered_at_ms,
                    "last_seen_ms": w.last_seen_ms,
                })
            })
            .collect(),
    )
}
