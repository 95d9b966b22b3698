//! `ProfileMap`: every profile's current state, found by its key.
//!
//! A set of `Arc<Profile>` in shards of hash tables, looked up by the key each profile carries.
//! The profile holds its key, so a slot is one pointer: at a million profiles the table costs
//! about 19 bytes per profile (an 8-byte slot and a control byte, at hashbrown's load factor)
//! where a map from a separate 32-byte key to the `Arc` (DashMap's slot, 40 bytes) cost about
//! 86, plus the key's second reference count. Shards keep point reads from many gRPC tasks
//! and the single writer off each other's locks, as DashMap's did.
//!
//! Not ordered (the store keeps the key order beside it), never shrinks, and knows nothing of
//! revisions or history.

use std::hash::BuildHasher;
use std::sync::{Arc, PoisonError, RwLock};

use hashbrown::HashTable;

use crate::profile::{Profile, ProfileKey};

/// The profiles by key, sharded.
pub(super) struct ProfileMap {
    // foldhash rather than SipHash: hashing was 6% of recovery and is part of every read; keys
    // come only from signed webhooks, and foldhash is still randomly seeded per map.
    hasher: foldhash::fast::RandomState,
    // A std `RwLock` per shard: reads share it, the one writer holds it for one insert.
    shards: Box<[RwLock<HashTable<Arc<Profile>>>]>,
    // How many of the hash's high bits are skipped before the shard bits: hashbrown uses the
    // top 7 bits within a table, so the shard is chosen from the bits below them.
    shard_shift: u32,
}

impl Default for ProfileMap {
    fn default() -> Self {
        // As DashMap chose: four shards per core, a power of two.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let shards = (cores * 4).next_power_of_two();
        ProfileMap {
            hasher: foldhash::fast::RandomState::default(),
            shards: (0..shards).map(|_| RwLock::default()).collect(),
            shard_shift: u64::BITS - shards.trailing_zeros(),
        }
    }
}

impl ProfileMap {
    /// The hash the map files `key` under ([`ProfileMap::insert_distinct`] takes it).
    pub(super) fn hash(&self, key: &ProfileKey) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard_index(&self, hash: u64) -> usize {
        if self.shards.len() == 1 {
            0
        } else {
            ((hash << 7) >> self.shard_shift) as usize
        }
    }

    fn shard(&self, hash: u64) -> &RwLock<HashTable<Arc<Profile>>> {
        &self.shards[self.shard_index(hash)]
    }

    /// The profile stored under `key`.
    pub(super) fn get(&self, key: &ProfileKey) -> Option<Arc<Profile>> {
        let hash = self.hash(key);
        let shard = self
            .shard(hash)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        shard
            .find(hash, |profile| profile.key == *key)
            .map(Arc::clone)
    }

    /// Stores `profile` under its key, replacing the one there; whether the key is new.
    pub(super) fn insert(&self, profile: Arc<Profile>) -> bool {
        let hash = self.hash(&profile.key);
        // A panic elsewhere while holding the lock cannot leave a table half-changed: each
        // change below is one slot write or one insert.
        let mut shard = self
            .shard(hash)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match shard.find_mut(hash, |stored| stored.key == profile.key) {
            Some(stored) => {
                *stored = profile;
                false
            }
            None => {
                shard.insert_unique(hash, profile, |stored| self.hash(&stored.key));
                true
            }
        }
    }

    /// Inserts profiles that are not in the map, none twice (a snapshot's, which recovery
    /// checks are in strictly increasing key order), each with its [`ProfileMap::hash`].
    ///
    /// Inserted one at a time as they were decoded, each landed in a random bucket of tables
    /// larger than the caches: two cache misses a profile, half of a snapshot's loading time
    /// at a million profiles. Here each shard is locked once and filled in bucket order, so
    /// consecutive inserts touch neighbouring memory, and none looks for the key first.
    pub(super) fn insert_distinct(&self, profiles: Vec<(u64, Arc<Profile>)>) {
        let mut by_shard: Vec<Vec<(u64, Arc<Profile>)>> = vec![Vec::new(); self.shards.len()];
        for (hash, profile) in profiles {
            debug_assert_eq!(
                hash,
                self.hash(&profile.key),
                "a profile under another hash"
            );
            by_shard[self.shard_index(hash)].push((hash, profile));
        }
        for (shard, mut profiles) in self.shards.iter().zip(by_shard) {
            let mut shard = shard.write().unwrap_or_else(PoisonError::into_inner);
            // Room first, so the bucket count (and with it each profile's bucket) stays put.
            shard.reserve(profiles.len(), |stored| self.hash(&stored.key));
            let buckets = bucket_mask(shard.capacity());
            profiles.sort_unstable_by_key(|(hash, _)| hash & buckets);
            for (hash, profile) in profiles {
                debug_assert!(
                    shard
                        .find(hash, |stored| stored.key == profile.key)
                        .is_none()
                );
                shard.insert_unique(hash, profile, |stored| self.hash(&stored.key));
            }
        }
    }

    /// Makes room for `additional` more profiles spread evenly over the shards (recovery knows
    /// how many a snapshot holds), so loading them rehashes nothing.
    pub(super) fn reserve(&self, additional: usize) {
        let per_shard = additional.div_ceil(self.shards.len());
        for shard in &self.shards {
            let mut shard = shard.write().unwrap_or_else(PoisonError::into_inner);
            shard.reserve(per_shard, |stored| self.hash(&stored.key));
        }
    }

    /// How many profiles it holds.
    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// The mask hashbrown takes a hash's bucket with (its low bits) in a table of `capacity`:
/// seven eighths of a power of two of buckets. Only an ordering hint: a wrong guess costs
/// locality, never correctness.
fn bucket_mask(capacity: usize) -> u64 {
    (capacity.saturating_mul(8) / 7).next_power_of_two() as u64 - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(customer: &str, revision: u64) -> Arc<Profile> {
        let mut profile = Profile::empty(ProfileKey::new("2155", customer));
        profile.revision = revision;
        Arc::new(profile)
    }

    #[test]
    fn inserts_replace_and_find_by_key() {
        let map = ProfileMap::default();
        assert!(map.insert(profile("a", 1)));
        assert!(map.insert(profile("b", 2)));
        assert!(!map.insert(profile("a", 3)), "a replaced, not added");
        assert_eq!(map.len(), 2);
        assert_eq!(map.get(&ProfileKey::new("2155", "a")).unwrap().revision, 3);
        assert_eq!(map.get(&ProfileKey::new("2155", "b")).unwrap().revision, 2);
        assert!(map.get(&ProfileKey::new("2155", "c")).is_none());
        assert!(map.get(&ProfileKey::new("other", "a")).is_none());
    }

    #[test]
    fn profiles_inserted_together_are_found_and_replaced_like_any_other() {
        let map = ProfileMap::default();
        assert!(map.insert(profile("before", 1)));
        map.reserve(100);
        // More than the room made: the shards grow while they take them.
        let together: Vec<_> = (0..3000)
            .map(|n| profile(&format!("c{n}"), n))
            .map(|profile| (map.hash(&profile.key), profile))
            .collect();
        map.insert_distinct(together);
        assert_eq!(map.len(), 3001);
        for n in 0..3000 {
            let key = ProfileKey::new("2155", format!("c{n}"));
            assert_eq!(map.get(&key).unwrap().revision, n, "{key:?}");
        }
        assert_eq!(
            map.get(&ProfileKey::new("2155", "before"))
                .unwrap()
                .revision,
            1
        );
        // Replaced in place by a later insert, and still found after the tables grow again.
        assert!(!map.insert(profile("c7", 9_999)));
        for n in 3000..9000 {
            assert!(map.insert(profile(&format!("c{n}"), n)));
        }
        assert_eq!(
            map.get(&ProfileKey::new("2155", "c7")).unwrap().revision,
            9_999
        );
        assert_eq!(
            map.get(&ProfileKey::new("2155", "c2999")).unwrap().revision,
            2999
        );
        assert_eq!(map.len(), 9001);
    }

    #[test]
    fn many_keys_across_shards_and_growth() {
        let map = ProfileMap::default();
        map.reserve(1000);
        for n in 0..5000 {
            assert!(map.insert(profile(&n.to_string(), n)));
        }
        assert_eq!(map.len(), 5000);
        for n in 0..5000 {
            let key = ProfileKey::new("2155", n.to_string());
            assert_eq!(map.get(&key).unwrap().revision, n);
        }
    }
}
