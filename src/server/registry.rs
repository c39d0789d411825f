//! The live connections of a server, for the control API to list, pause,
//! resume and cut; and the server's write cache, which outlives them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::cache::WriteCache;
use crate::intercept::ConnId;
use crate::proxy::Connection;

#[derive(Default)]
pub struct Registry {
    conns: Mutex<BTreeMap<ConnId, Arc<Connection>>>,
    /// `--write-cache volatile`; unset when off.
    write_cache: OnceLock<Arc<WriteCache>>,
}

impl Registry {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<ConnId, Arc<Connection>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, conn: Arc<Connection>) {
        self.map().insert(conn.id, conn);
    }

    pub fn remove(&self, id: ConnId) {
        self.map().remove(&id);
    }

    pub fn get(&self, id: ConnId) -> Option<Arc<Connection>> {
        self.map().get(&id).cloned()
    }

    /// Every live connection, oldest first.
    pub fn list(&self) -> Vec<Arc<Connection>> {
        self.map().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// The server's volatile write cache, when it has one.
    pub fn write_cache(&self) -> Option<&Arc<WriteCache>> {
        self.write_cache.get()
    }

    pub(super) fn set_write_cache(&self, cache: Arc<WriteCache>) {
        let _ = self.write_cache.set(cache);
    }
}
