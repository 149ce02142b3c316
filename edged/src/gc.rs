//! Image garbage collection: the ledger of images edged pulled or used
//! (`<homedir>/gc/image_use`, lines `<image id> <unix seconds>`, rewritten atomically), and the
//! periodic sweep that removes old, unused ledger images. Images edged never recorded are never
//! touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use config_common::files;

/// The ledger's file name in `<homedir>/gc`.
const LEDGER_FILE: &str = "image_use";

/// The image-use ledger.
#[derive(Debug)]
pub struct Ledger {
    folder: PathBuf,
    entries: Mutex<BTreeMap<String, i64>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Parses ledger text; malformed lines are skipped.
pub fn parse_ledger(text: &str) -> BTreeMap<String, i64> {
    text.lines()
        .filter_map(|line| {
            let (id, seconds) = line.trim().split_once(' ')?;
            Some((id.to_owned(), seconds.trim().parse().ok()?))
        })
        .collect()
}

impl Ledger {
    /// Opens (or starts) the ledger at `<homedir>/gc/image_use`.
    pub fn open(homedir: &Path) -> Self {
        let folder = homedir.join("gc");
        let entries = std::fs::read_to_string(folder.join(LEDGER_FILE))
            .map(|text| parse_ledger(&text))
            .unwrap_or_default();
        Ledger {
            folder,
            entries: Mutex::new(entries),
        }
    }

    /// Applies `change` and rewrites the file while still holding the lock, so concurrent
    /// changes reach the disk in the order they were made.
    fn update(&self, change: impl FnOnce(&mut BTreeMap<String, i64>)) {
        let mut entries = lock(&self.entries);
        change(&mut entries);
        if let Err(error) =
            files::write_atomic(&self.folder, LEDGER_FILE, render(&entries).as_bytes())
        {
            log::warn!("could not write the image ledger: {error}");
        }
    }

    /// Records that `image_id` was used now.
    pub fn record(&self, image_id: &str) {
        if image_id.is_empty() {
            return;
        }
        self.update(|entries| {
            entries.insert(image_id.to_owned(), crate::time::now_unix());
        });
    }

    /// Forgets `image_id`.
    pub fn forget(&self, image_id: &str) {
        self.update(|entries| {
            entries.remove(image_id);
        });
    }

    /// Images last used before `cutoff` (Unix seconds).
    pub fn older_than(&self, cutoff: i64) -> Vec<String> {
        lock(&self.entries)
            .iter()
            .filter(|(_, seconds)| **seconds < cutoff)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

fn render(entries: &BTreeMap<String, i64>) -> String {
    entries
        .iter()
        .map(|(id, seconds)| format!("{id} {seconds}\n"))
        .collect()
}

/// Seconds from now until the next local `minutes`-after-midnight.
pub fn seconds_until_local(minutes: u32) -> u64 {
    let now = crate::time::now_unix();
    let offset = local_utc_offset(now);
    let local_seconds_today = (now + offset).rem_euclid(86_400);
    let target = i64::from(minutes) * 60;
    let wait = (target - local_seconds_today).rem_euclid(86_400);
    u64::try_from(wait).unwrap_or(0)
}

fn local_utc_offset(now: i64) -> i64 {
    let time: libc::time_t = now;
    // SAFETY: `tm` is plain data that localtime_r fully initializes on success; both pointers are
    // valid for the duration of the call.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: see above; localtime_r is the thread-safe variant.
    let result = unsafe { libc::localtime_r(&time, &mut tm) };
    if result.is_null() {
        0
    } else {
        tm.tm_gmtoff
    }
}

/// Ledger images to delete now: older than `threshold_secs`, not in `in_use`, not `keep`.
pub fn sweep_candidates(
    ledger: &Ledger,
    threshold_secs: u64,
    in_use: &[String],
    keep: Option<&str>,
) -> Vec<String> {
    let cutoff = crate::time::now_unix() - i64::try_from(threshold_secs).unwrap_or(i64::MAX);
    ledger
        .older_than(cutoff)
        .into_iter()
        .filter(|id| !in_use.contains(id) && Some(id.as_str()) != keep)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_records_and_selects() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("gc")).unwrap();
        let ledger = Ledger::open(dir.path());
        ledger.record("sha256:a");
        ledger.record("sha256:b");
        let reopened = Ledger::open(dir.path());
        assert_eq!(reopened.older_than(i64::MAX).len(), 2);
        let mode = std::fs::metadata(dir.path().join("gc/image_use"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(sweep_candidates(&reopened, 3600, &[], None).is_empty());
        // An image last used two hours ago is a candidate for a one-hour threshold, unless it
        // is in use or the one to keep (no test here depends on the clock's next second).
        let old = crate::time::now_unix() - 7200;
        std::fs::write(
            dir.path().join("gc/image_use"),
            format!("sha256:old {old}\nsha256:a {}\n", crate::time::now_unix()),
        )
        .unwrap();
        let with_old = Ledger::open(dir.path());
        assert_eq!(
            sweep_candidates(&with_old, 3600, &[], None),
            vec!["sha256:old".to_owned()]
        );
        assert!(sweep_candidates(&with_old, 3600, &["sha256:old".to_owned()], None).is_empty());
        assert!(sweep_candidates(&with_old, 3600, &[], Some("sha256:old")).is_empty());
        with_old.forget("sha256:a");
        assert_eq!(
            Ledger::open(dir.path()).older_than(i64::MAX),
            vec!["sha256:old".to_owned()]
        );
        assert_eq!(parse_ledger("x 1\nbad\ny two\nz 3\n").len(), 2);
        assert!(seconds_until_local(0) <= 86_400);
    }
}
