//! Locking a std `Mutex` whose holder may have panicked.
//!
//! A mutex is poisoned when a thread panics while holding it. For the values locked through
//! [`lock`], every change replaces whole entries or plain values under the lock, so a panic
//! elsewhere cannot leave them half-changed: the value is still consistent, and serving it
//! beats making every later caller panic too. A value that a panic could leave half-changed
//! must not be locked through here.
//!
//! Not here: `RwLock`s (their few callers say the same inline) and async locks.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, poisoned or not (see the module documentation for when that is sound).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
