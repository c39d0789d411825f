//! The live connections of a server, for the control API to list, pause,
//! resume and cut.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::intercept::ConnId;
use crate::proxy::Connection;

#[derive(Default)]
pub struct Registry {
    conns: Mutex<BTreeMap<ConnId, Arc<Connection>>>,
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
}
