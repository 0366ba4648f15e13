//! Every function the gateway serves, by name: found once per request.

use std::sync::Arc;

use dashmap::DashMap;

use super::Function;

/// The functions, by name. A lookup clones one `Arc` under a shard's read lock, released at once;
/// it is a concurrent map rather than one built once because functions discovered from a cluster
/// come and go while the gateway runs.
#[derive(Default)]
pub struct Functions {
    map: DashMap<String, Arc<Function>, NameHasher>,
}

impl std::fmt::Debug for Functions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Functions")
            .field("len", &self.map.len())
            .finish()
    }
}

impl Functions {
    /// Finds a function by name.
    pub fn get(&self, name: &str) -> Option<Arc<Function>> {
        self.map.get(name).map(|f| f.value().clone())
    }

    /// Adds (or replaces) a function.
    pub fn insert(&self, function: Arc<Function>) {
        self.map.insert(function.name.to_string(), function);
    }

    /// Removes a function (requests already holding it finish).
    pub fn remove(&self, name: &str) -> Option<Arc<Function>> {
        self.map.remove(name).map(|(_, f)| f)
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every function, in no particular order.
    pub fn all(&self) -> Vec<Arc<Function>> {
        self.map.iter().map(|f| f.value().clone()).collect()
    }

    /// Calls `f` with each function, holding one shard's read lock at a time.
    pub fn for_each(&self, mut f: impl FnMut(&Arc<Function>)) {
        for entry in self.map.iter() {
            f(entry.value());
        }
    }
}

/// FNV-1a for the function map: its keys come from the config, never from clients, so a keyed
/// (HashDoS-resistant) hash buys nothing on a lookup-only path and SipHash costs more.
pub type NameHasher = std::hash::BuildHasherDefault<Fnv>;

/// FNV-1a, 64 bits.
#[derive(Debug)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
}
