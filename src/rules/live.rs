//! The rule set of a running server, changeable while clients are
//! connected (control API, SIGHUP).
//!
//! Every event reads the current engine through an `ArcSwap`, which costs a
//! couple of atomic operations and never blocks; a change builds a new
//! engine and swaps it in, so live connections see it from their next event.
//! Rules kept across a change keep their counters.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use thiserror::Error;

use crate::intercept::{ConnState, Event, Interceptor, Verdict};

use super::engine::Engine;
use super::fields::RuleError;
use super::model::RuleSet;
use super::{Notice, load_files_noting};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChangeError {
    #[error("a rule named \"{0}\" already exists")]
    Duplicate(String),
}

pub struct LiveRules {
    engine: ArcSwap<Engine>,
    /// Serialises changes (events never take it).
    change: Mutex<()>,
    next_ordinal: AtomicU64,
    files: Vec<PathBuf>,
    seed_override: Option<u64>,
}

impl LiveRules {
    /// Rules loaded from `files` (re-read by [`LiveRules::reload`]).
    pub fn new(set: RuleSet, files: Vec<PathBuf>, seed_override: Option<u64>) -> Self {
        let n = set.rules.len() as u64;
        Self {
            engine: ArcSwap::from_pointee(Engine::new(set)),
            change: Mutex::new(()),
            next_ordinal: AtomicU64::new(n),
            files,
            seed_override,
        }
    }

    /// The engine in force now.
    pub fn current(&self) -> Arc<Engine> {
        self.engine.load_full()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.change.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn loaded(&self, seed: u64, set: RuleSet) -> Vec<Arc<super::engine::Loaded>> {
        set.rules
            .into_iter()
            .map(|r| Engine::load(seed, self.next_ordinal.fetch_add(1, Ordering::Relaxed), r))
            .collect()
    }

    /// Appends `set`'s rules after the existing ones; nothing changes if a
    /// name is taken.
    pub fn add(&self, set: RuleSet) -> Result<(), ChangeError> {
        let _g = self.lock();
        let cur = self.current();
        if let Some(dup) = set
            .rules
            .iter()
            .find(|r| cur.rules().iter().any(|l| l.rule().name == r.name))
        {
            return Err(ChangeError::Duplicate(dup.name.clone()));
        }
        let mut rules = cur.rules().to_vec();
        rules.extend(self.loaded(cur.seed(), set));
        // The state machine in force goes on (a `state:` in `set` is
        // for a replace).
        self.engine.store(Arc::new(
            Engine::from_loaded(cur.seed(), rules).sharing_state(&cur),
        ));
        Ok(())
    }

    /// Replaces every rule (and the seed, unless it was fixed by --seed).
    pub fn replace(&self, set: RuleSet) {
        let _g = self.lock();
        let seed = self.seed_override.unwrap_or(set.seed);
        let state = set.state;
        let rules = self.loaded(seed, set);
        self.engine.store(Arc::new(
            Engine::from_loaded(seed, rules).starting_in(state),
        ));
    }

    /// Removes the rule named `name`; false if there is none.
    pub fn remove(&self, name: &str) -> bool {
        let _g = self.lock();
        let cur = self.current();
        let rules: Vec<_> = cur
            .rules()
            .iter()
            .filter(|l| l.rule().name != name)
            .cloned()
            .collect();
        if rules.len() == cur.rules().len() {
            return false;
        }
        self.engine.store(Arc::new(
            Engine::from_loaded(cur.seed(), rules).sharing_state(&cur),
        ));
        true
    }

    /// Re-reads the rules files given at startup; on error the rules in
    /// force stay as they are. A file that looks caught mid-write (blank,
    /// or its last line without a newline) is an error here: loading its
    /// valid prefix would run rules nobody wrote (see [`Notice::refusal`]).
    /// Returns the number of rules now loaded and what deserves a warning.
    pub fn reload(&self) -> Result<(usize, Vec<Notice>), RuleError> {
        let (set, notices) = load_files_noting(&self.files, self.seed_override)?;
        if let Some(refused) = notices.iter().find_map(Notice::refusal) {
            return Err(refused);
        }
        let n = set.rules.len();
        self.replace(set);
        Ok((n, notices))
    }
}

impl Interceptor for LiveRules {
    fn on_event(&self, event: &Event, state: &mut ConnState) -> Verdict {
        let engine = self.engine.load();
        if engine.is_empty() {
            return Verdict::Pass;
        }
        engine.on_event(event, state)
    }

    fn is_idle(&self) -> bool {
        self.engine.load().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::parse_str;

    fn set(text: &str) -> RuleSet {
        parse_str("t.yaml", text).expect("valid rules")
    }

    /// A reload refuses a blank file and one whose last line is cut short,
    /// keeping the rules in force; a file with no rules but some text
    /// (`rules: []`) clears them, with a notice.
    #[test]
    fn reload_refuses_files_caught_mid_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.yaml");
        let good =
            "rules:\n  - name: slow\n    event: request\n    action: delay\n    duration: 1s\n";
        std::fs::write(&path, good).unwrap();
        let live = LiveRules::new(set(good), vec![path.clone()], None);
        let names = |live: &LiveRules| -> Vec<String> {
            live.current().stats().into_iter().map(|s| s.name).collect()
        };
        // Cut before its action, the delay rule would load as a disconnect.
        let cut = &good[..good.find("\n    action").unwrap()];
        for (text, at) in [("", (1, 1)), ("\n  \n", (1, 1)), (cut, (3, 19))] {
            std::fs::write(&path, text).unwrap();
            let e = live.reload().unwrap_err();
            assert_eq!((e.line, e.column), at, "{text:?}: {e}");
            assert!(e.message.contains("caught mid-write"), "{e}");
            assert!(e.message.contains("then mv it over"), "{e}");
            assert_eq!(names(&live), ["slow"]);
        }
        std::fs::write(&path, "rules: []\n").unwrap();
        let (n, notices) = live.reload().unwrap();
        assert_eq!(n, 0);
        assert_eq!(
            notices,
            [Notice::NoRules {
                file: path.display().to_string(),
                blank: false
            }]
        );
        std::fs::write(&path, good).unwrap();
        assert_eq!(live.reload().unwrap(), (1, vec![]));
        assert_eq!(names(&live), ["slow"]);
    }

    #[test]
    fn add_replace_remove() {
        let live = LiveRules::new(
            set("rules:\n  - name: a\n    event: request\n    action: drop\n"),
            vec![],
            None,
        );
        assert_eq!(
            live.add(set("rules:\n  - name: a\n    event: reply\n")),
            Err(ChangeError::Duplicate("a".into()))
        );
        live.add(set("rules:\n  - name: b\n    event: reply\n"))
            .unwrap();
        let names: Vec<_> = live.current().stats().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(live.remove("a"));
        assert!(!live.remove("a"));
        live.replace(set("seed: 9\nrules:\n  - name: c\n    event: neg1\n"));
        assert_eq!(live.current().seed(), 9);
        assert_eq!(live.current().stats()[0].name, "c");
    }
}
