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
use super::load_files;
use super::model::RuleSet;

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
        self.engine
            .store(Arc::new(Engine::from_loaded(cur.seed(), rules)));
        Ok(())
    }

    /// Replaces every rule (and the seed, unless it was fixed by --seed).
    pub fn replace(&self, set: RuleSet) {
        let _g = self.lock();
        let seed = self.seed_override.unwrap_or(set.seed);
        let rules = self.loaded(seed, set);
        self.engine
            .store(Arc::new(Engine::from_loaded(seed, rules)));
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
        self.engine
            .store(Arc::new(Engine::from_loaded(cur.seed(), rules)));
        true
    }

    /// Re-reads the rules files given at startup; on error the rules in
    /// force stay as they are. Returns the number of rules now loaded.
    pub fn reload(&self) -> Result<usize, RuleError> {
        let set = load_files(&self.files, self.seed_override)?;
        let n = set.rules.len();
        self.replace(set);
        Ok(n)
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
