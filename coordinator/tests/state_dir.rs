//! The state directory: a damaged one is refused before anything in it is written (naming the
//! file), an unrelated database is never adopted, one coordinator at a time holds it, a clean
//! shutdown leaves the whole state in `sweep.db`, and `backup` copies a live one consistently.

use std::path::Path;
use std::time::Duration;

use sweep_coordinator::history;
use sweep_coordinator::server::{self, Config};
use sweep_coordinator::store::{SqliteStore, Store, StoreError};
use sweep_core::spec;
use sweep_proto::v1;

const SPEC: &str = "\
name: state
dataset: { kind: synthetic, classes: 3 }
grid:
  backbone: [resnet18, resnet50]
  lr_decay: [{ strategy: linear }]
  epoch_split: [[1, 1]]
";

/// Every file of a directory with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap_or_default())
        })
        .collect();
    out.sort();
    out
}

/// A state directory with a sweep in it, its database closed the way a killed coordinator
/// leaves it: everything still in the write-ahead log (the `.db` never checkpointed).
fn state_with_wal(dir: &Path) -> String {
    let mut store = SqliteStore::open(dir).unwrap();
    let id = store.submit(SPEC, "s.yaml", &spec::parse(SPEC).unwrap()).unwrap().sweep_id;
    // Keep the log: copy the files while the store is open (as after kill -9), then drop it.
    let copy = dir.join("../killed");
    std::fs::create_dir_all(&copy).unwrap();
    for name in ["sweep.db", "sweep.db-wal"] {
        std::fs::copy(dir.join(name), copy.join(name)).unwrap();
    }
    drop(store);
    for name in ["sweep.db", "sweep.db-wal", "sweep.db-shm"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    for name in ["sweep.db", "sweep.db-wal"] {
        std::fs::copy(copy.join(name), dir.join(name)).unwrap();
    }
    assert!(std::fs::metadata(dir.join("sweep.db-wal")).unwrap().len() > 0);
    id
}

fn refused(dir: &Path, fragments: &[&str]) {
    let before = files(dir);
    let err = match SqliteStore::open(dir) {
        Ok(_) => panic!("{} was opened", dir.display()),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::Damaged(_)), "{err:?}");
    let text = err.to_string();
    for f in fragments {
        assert!(text.contains(f), "`{f}` not in: {text}");
    }
    // Nothing in it was touched: same files, same bytes (the lock file aside).
    let after: Vec<_> = files(dir).into_iter().filter(|(n, _)| n != "sweep.lock").collect();
    let before: Vec<_> = before.into_iter().filter(|(n, _)| n != "sweep.lock").collect();
    assert_eq!(after, before, "the refused state directory was changed");
}

#[test]
fn a_write_ahead_log_without_its_database_is_refused_and_kept() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("state");
    let sweep = state_with_wal(&dir);
    std::fs::remove_file(dir.join("sweep.db")).unwrap();
    refused(&dir, &["sweep.db is missing", "sweep.db-wal", "bytes) is there", "restore"]);
    // Put the database back: everything is there, nothing was lost.
    std::fs::copy(root.path().join("killed/sweep.db"), dir.join("sweep.db")).unwrap();
    let store = SqliteStore::open(&dir).unwrap();
    assert_eq!(store.get_sweep(&sweep).unwrap().trials.len(), 2);
}

#[test]
fn an_empty_or_foreign_database_is_refused_naming_it() {
    let root = tempfile::tempdir().unwrap();
    // 0 bytes, beside a log full of state.
    let dir = root.path().join("empty");
    state_with_wal(&dir);
    std::fs::write(dir.join("sweep.db"), b"").unwrap();
    refused(&dir, &["sweep.db is empty (0 bytes)", "-byte sweep.db-wal", "nothing was changed"]);
    // 0 bytes alone.
    let dir = root.path().join("empty-alone");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("sweep.db"), b"").unwrap();
    refused(&dir, &["is empty (0 bytes)"]);
    // Not SQLite at all.
    let dir = root.path().join("text");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("sweep.db"), b"these are my notes, not a database\n").unwrap();
    refused(&dir, &["is not an SQLite database"]);
    // Someone else's SQLite database: never adopted.
    let dir = root.path().join("foreign");
    std::fs::create_dir_all(&dir).unwrap();
    {
        let c = rusqlite::Connection::open(dir.join("sweep.db")).unwrap();
        c.execute_batch("CREATE TABLE recipes(name TEXT); INSERT INTO recipes VALUES ('soup');").unwrap();
    }
    refused(&dir, &["not a sweep state database", "tables: recipes"]);
    let c = rusqlite::Connection::open(dir.join("sweep.db")).unwrap();
    let n: i64 = c.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 1, "no table was added to it");
}

#[test]
fn a_new_state_directory_is_made_whole_or_not_at_all() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("new");
    drop(SqliteStore::open(&dir).unwrap());
    let names: Vec<String> = files(&dir).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"sweep.db".to_string()) && names.contains(&"sweep.lock".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.ends_with(".new")), "{names:?}");
    // A leftover of a creation that was interrupted is not a database and is replaced.
    let dir = root.path().join("interrupted");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("sweep.db.new"), b"half").unwrap();
    let store = SqliteStore::open(&dir).unwrap();
    assert!(store.list_sweeps().unwrap().is_empty());
}

#[test]
fn one_store_at_a_time_holds_a_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let err = SqliteStore::open(dir.path()).err().expect("a second store was let in");
    let text = err.to_string();
    assert!(
        text.contains("is in use by another coordinator") && text.contains(&format!("pid {}", std::process::id())),
        "{text}"
    );
    // Read-only tools still work while it is held.
    assert!(history::check_state_dir(dir.path()).unwrap().is_clean());
    drop(store);
    drop(SqliteStore::open(dir.path()).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_leaves_everything_in_the_database_file_and_backup_copies_a_live_one() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("state");
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.clone());
    config.heartbeat_ttl = Duration::from_secs(300);
    let running = server::start(config.clone()).await.unwrap();
    // A second coordinator on the same directory is refused while the first runs.
    let mut second = config.clone();
    second.listen = "127.0.0.1:0".parse().unwrap();
    let err = server::start(second).await.err().expect("two coordinators on one state directory");
    assert!(format!("{err:#}").contains("in use by another coordinator"), "{err:#}");

    let url = format!("http://{}", running.addr);
    let mut c = v1::sweep_service_client::SweepServiceClient::connect(url).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let req = v1::SubmitSweepRequest { spec_yaml: SPEC.into(), source: "s.yaml".into(), ..Default::default() };
        ids.push(c.submit_sweep(req).await.unwrap().into_inner().sweep_id);
    }
    // A backup while it runs: consistent, checked, and refusing to overwrite.
    let copy = root.path().join("copy.db");
    let report = history::backup(&dir, &copy).unwrap();
    assert_eq!((report.sweeps, report.trials), (3, 6));
    assert!(report.is_clean(), "{report}");
    assert!(history::backup(&dir, &copy).unwrap_err().to_string().contains("already exists"));
    running.stop().await.unwrap();

    // The log was checkpointed into sweep.db and emptied: the .db alone holds everything.
    let wal = std::fs::metadata(dir.join("sweep.db-wal")).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal, 0, "the write-ahead log still holds data after a clean stop");
    let alone = root.path().join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    std::fs::copy(dir.join("sweep.db"), alone.join("sweep.db")).unwrap();
    let store = SqliteStore::open(&alone).unwrap();
    assert_eq!(store.list_sweeps().unwrap().len(), 3);
    // And the backup restores: a state directory of its own.
    let restored = root.path().join("restored");
    std::fs::create_dir_all(&restored).unwrap();
    std::fs::copy(&copy, restored.join("sweep.db")).unwrap();
    let store = SqliteStore::open(&restored).unwrap();
    let listed: Vec<String> = store.list_sweeps().unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(listed.len(), 3);
    assert!(ids.iter().all(|id| listed.contains(id)));
    // After the clean stop the directory is free again.
    drop(SqliteStore::open(&dir).unwrap());
}
