//! `daemon::watch_config` against real files and real inotify: a change is read once the files
//! have been quiet for the debounce, a drop-in folder created after start is watched, and an
//! invalid change keeps the configuration in force; a change made between reading the
//! configuration and starting the watch is applied too.

use std::time::{Duration, Instant};

use config_common::{ConfigError, ConfigPaths, Loaded};
use http_common::daemon::{watch_config, ConfigFiles, CONFIG_DEBOUNCE};
use tokio::sync::mpsc;

/// The value of `x` in the merged configuration; a missing `x` is invalid.
fn load_x(loaded: &Loaded) -> Result<i64, ConfigError> {
    loaded
        .table
        .get("x")
        .and_then(|value| value.as_integer())
        .ok_or_else(|| ConfigError::Invalid {
            files: loaded.files_defining("x"),
            key: "x".into(),
            message: "must be an integer".into(),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_read_once_after_the_debounce_and_invalid_ones_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let paths = ConfigPaths {
        base_file: dir.path().join("config.toml"),
        dropin_dir: dir.path().join("config.d"),
    };
    std::fs::write(&paths.base_file, "x = 0\n").unwrap();
    let (sender, mut applied) = mpsc::unbounded_channel();
    let watcher = tokio::spawn(watch_config(
        ConfigFiles::new(paths.clone()),
        load_x,
        move |x| {
            sender.send((x, Instant::now())).unwrap();
            std::future::ready(())
        },
    ));
    // Let the watcher set up its watches before the first change.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The drop-in folder appears after start; two writes of the same size in quick succession
    // are one change, read whole once the files have been quiet for the debounce.
    std::fs::create_dir(&paths.dropin_dir).unwrap();
    let dropin = paths.dropin_dir.join("50-x.toml");
    std::fs::write(&dropin, "x = 1\n").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::write(&dropin, "x = 2\n").unwrap();
    let last_write = Instant::now();
    let (x, at) = tokio::time::timeout(CONFIG_DEBOUNCE * 3, applied.recv())
        .await
        .expect("the change was not applied")
        .unwrap();
    assert_eq!(x, 2);
    assert!(
        at.duration_since(last_write) >= CONFIG_DEBOUNCE,
        "applied {:?} after the last write",
        at.duration_since(last_write)
    );

    // An invalid change is not applied; the next valid one is.
    std::fs::write(&dropin, "x = \"two\"\n").unwrap();
    tokio::time::sleep(CONFIG_DEBOUNCE + Duration::from_secs(2)).await;
    assert!(applied.try_recv().is_err(), "an invalid change was applied");
    std::fs::write(&dropin, "x = 3\n").unwrap();
    let (x, _) = tokio::time::timeout(CONFIG_DEBOUNCE * 3, applied.recv())
        .await
        .expect("the change after an invalid one was not applied")
        .unwrap();
    assert_eq!(x, 3);
    watcher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_the_daemon_was_starting_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let paths = ConfigPaths {
        base_file: dir.path().join("config.toml"),
        dropin_dir: dir.path().join("config.d"),
    };
    std::fs::write(&paths.base_file, "x = 0\n").unwrap();
    // What a daemon's start does: fingerprint, read (x = 0), ... and only later watch.
    let files = ConfigFiles::new(paths.clone());
    std::fs::write(&paths.base_file, "x = 7\n").unwrap();
    let (sender, mut applied) = mpsc::unbounded_channel();
    let watcher = tokio::spawn(watch_config(files, load_x, move |x| {
        sender.send(x).unwrap();
        std::future::ready(())
    }));
    let x = tokio::time::timeout(CONFIG_DEBOUNCE * 3, applied.recv())
        .await
        .expect("the change made during start-up was not applied")
        .unwrap();
    assert_eq!(x, 7);
    watcher.abort();
}
