//! The last known state of the sagas this instance drives, so that a reply
//! costs one statement: the engine applies it to the cached state and writes
//! with compare-and-set on the saga's revision. A stale entry (another
//! instance moved the saga on) only makes that write change nothing; the
//! engine then reloads the saga under a row lock.

use std::{collections::HashMap, sync::Mutex};

use sagas::SagaInstance;
use uuid::Uuid;

/// Active sagas by id (bounded; terminal sagas are dropped).
#[derive(Debug)]
pub struct SagaCache {
    /// The states.
    states: Mutex<HashMap<Uuid, SagaInstance>>,
    /// Most entries kept; beyond it new sagas are simply not cached.
    capacity: usize,
}

impl SagaCache {
    /// Sagas kept in memory by default.
    pub const DEFAULT_CAPACITY: usize = 100_000;

    /// A cache of at most `capacity` sagas.
    pub fn new(capacity: usize) -> Self {
        Self {
            states: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// Copies of the cached states among `ids`, and the ids not cached.
    pub fn get_many(&self, ids: &[Uuid]) -> (HashMap<Uuid, SagaInstance>, Vec<Uuid>) {
        let states = self.states.lock().expect("saga cache lock");
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        for id in ids {
            match states.get(id) {
                Some(state) => {
                    found.insert(*id, state.clone());
                }
                None => missing.push(*id),
            }
        }
        (found, missing)
    }

    /// Records a committed state (or forgets it once the saga is terminal).
    pub fn store(&self, state: &SagaInstance) {
        let mut states = self.states.lock().expect("saga cache lock");
        if state.status.is_terminal() {
            states.remove(&state.id);
        } else if states.len() < self.capacity || states.contains_key(&state.id) {
            states.insert(state.id, state.clone());
        }
    }

    /// Forgets a saga (its cached copy proved stale).
    pub fn forget(&self, id: &Uuid) {
        self.states.lock().expect("saga cache lock").remove(id);
    }
}
