//! What the tool sends: customer ids, signed `customer.profile.updated` bodies with realistic
//! field sizes, and the protobuf profile those bodies become (which the no-op gRPC baseline
//! answers with, so both sides move the same bytes).
//!
//! Everything is a pure function of the customer number and a sequence number, so any run can
//! name any customer it loaded before without keeping a list.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use profile_state::pb;
use profile_state::webhook::signature::SignatureCheck;

/// `created_at` of sequence number 0; every later sequence number is one microsecond later.
const EPOCH_MICROS: i64 = 1_735_689_600_000_000; // 2025-01-01T00:00:00Z

const TIERS: [&str; 4] = ["Bronze", "Silver", "Gold", "Platinum"];

/// The bodies and ids of one run: which account, how many customers, and the secret to sign
/// with. Shared by all workers; the sequence counter makes every body newer than the last.
pub struct Workload {
    /// The Gameball account every profile belongs to.
    pub client_id: String,
    /// How many distinct customers the run addresses (`0..customers`).
    pub customers: u64,
    signer: SignatureCheck,
    sequence: AtomicU64,
}

/// One signed delivery.
pub struct Delivery {
    pub body: Bytes,
    pub signature: String,
}

impl Workload {
    pub fn new(client_id: &str, customers: u64, secret: &str) -> Self {
        Workload {
            client_id: client_id.to_owned(),
            customers: customers.max(1),
            signer: SignatureCheck::new(secret),
            // Start from the wall clock so a second run against the same store still sends
            // newer updates (an older `created_at` would be answered `unchanged`, and cost less).
            // In microseconds: a run sends far fewer than a million updates a second, so it
            // never gets ahead of the clock, and the next run starts past its last update (in
            // milliseconds a run of 25,000 a second ran 25 times ahead of it, and the next one
            // minutes later sent mostly older updates).
            sequence: AtomicU64::new(now_micros()),
        }
    }

    /// The customer id of customer `n`: 36 characters, UUID-shaped, as integrators' ids often
    /// are (and as the memory estimate in the performance notes assumes).
    pub fn customer_id(n: u64) -> String {
        let h = splitmix(n);
        format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            h >> 32,
            (h >> 16) & 0xffff,
            h & 0xfff,
            (h >> 20) & 0xfff,
            n & 0xffff_ffff_ffff
        )
    }

    /// A signed update of customer `n` that is newer than every earlier one of this workload,
    /// so the service applies it (a real change, a journal record, a watch event).
    pub fn update(&self, n: u64) -> Delivery {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let body = Bytes::from(self.body(n, sequence));
        let signature = self.signer.sign(&body);
        Delivery { body, signature }
    }

    fn body(&self, n: u64, sequence: u64) -> String {
        let fields = Fields::of(n, sequence);
        let created_at = chrono::DateTime::from_timestamp_micros(EPOCH_MICROS + sequence as i64)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        format!(
            concat!(
                r#"{{"event":"customer.profile.updated","client_id":"{client}","#,
                r#""customer_id":"{customer}","gb_customer_id":{gb},"created_at":"{at}","#,
                r#""data":{{"email":"{email}","mobile_number":"{mobile}","tier_name":"{tier}","#,
                r#""tier_order":{order},"referral_code":"{code}","referral_link":"{link}","#,
                r#""activated_points":{active},"pending_points":{pending},"total_points":{total}}}}}"#
            ),
            client = self.client_id,
            customer = Self::customer_id(n),
            gb = fields.gb_customer_id,
            at = created_at,
            email = fields.email,
            mobile = fields.mobile,
            tier = fields.tier,
            order = fields.tier_order,
            code = fields.referral_code,
            link = fields.referral_link,
            active = fields.activated,
            pending = fields.pending,
            total = fields.activated + fields.pending,
        )
    }

    /// The profile customer `n` has after one update: what GetProfile returns for it. The
    /// no-op gRPC baseline answers with this, so its messages are the size of ours.
    pub fn profile(&self, n: u64) -> pb::Profile {
        let fields = Fields::of(n, 0);
        pb::Profile {
            client_id: self.client_id.clone(),
            customer_id: Self::customer_id(n),
            gb_customer_id: fields.gb_customer_id,
            email: Some(fields.email),
            mobile_number: Some(fields.mobile),
            tier_name: Some(fields.tier.to_owned()),
            tier_order: Some(fields.tier_order),
            referral_code: Some(fields.referral_code),
            referral_link: Some(fields.referral_link),
            activated_points: Some(fields.activated),
            pending_points: Some(fields.pending),
            total_points: Some(fields.activated + fields.pending),
            extra: None,
            updated_at: Some(prost_types::Timestamp {
                seconds: EPOCH_MICROS / 1_000_000 + 86_400 * 365,
                nanos: 123_000_000,
            }),
            revision: 1_234_567,
            create_revision: 234_567,
            version: 3,
        }
    }
}

/// Field values of one customer: fixed per customer (sizes stay put), points move with the
/// sequence number so every update changes something.
struct Fields {
    gb_customer_id: i64,
    email: String,
    mobile: String,
    tier: &'static str,
    tier_order: i32,
    referral_code: String,
    referral_link: String,
    activated: i64,
    pending: i64,
}

impl Fields {
    fn of(n: u64, sequence: u64) -> Fields {
        let h = splitmix(n ^ 0x5eed);
        let tier = (h % TIERS.len() as u64) as usize;
        let code = format!("{:08X}", h >> 32);
        Fields {
            gb_customer_id: 10_000_000 + n as i64,
            email: format!("customer.{n:08}@example-mail.com"),
            mobile: format!("+2010{:08}", h % 100_000_000),
            tier: TIERS[tier],
            tier_order: tier as i32 + 1,
            referral_link: format!("https://gameball.app/r/{code}"),
            referral_code: code,
            activated: (h % 50_000) as i64 + (sequence % 1000) as i64,
            pending: ((h >> 8) % 1000) as i64,
        }
    }
}

/// Microseconds from [`EPOCH_MICROS`] to now.
fn now_micros() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_micros() - EPOCH_MICROS).unwrap_or(0)
}

fn splitmix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small, fast, seedable generator for picking customers (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }

    /// Uniform in `0..bound` (bound > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn ids_are_distinct_and_uuid_shaped() {
        let ids: std::collections::HashSet<_> = (0..10_000).map(Workload::customer_id).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|id| id.len() == 36));
    }

    #[test]
    fn bodies_are_signed_json_and_newer_each_time() {
        let workload = Workload::new("bench", 10, "s");
        let (a, b) = (workload.update(3), workload.update(3));
        let parse = |d: &Delivery| serde_json::from_slice::<serde_json::Value>(&d.body).unwrap();
        assert!(parse(&a)["created_at"].as_str() < parse(&b)["created_at"].as_str());
        assert_eq!(a.signature, SignatureCheck::new("s").sign(&a.body));
        assert!(workload.profile(3).encoded_len() > 150);
    }

    /// A run sends updates faster than a millisecond apart; one started after it must still
    /// be newer than everything it sent, or a second run against the same service is answered
    /// `unchanged`.
    #[test]
    fn a_later_run_is_newer_than_everything_an_earlier_fast_one_sent() {
        let created_at = |d: &Delivery| {
            let body = serde_json::from_slice::<serde_json::Value>(&d.body).unwrap();
            chrono::DateTime::parse_from_rfc3339(body["created_at"].as_str().unwrap()).unwrap()
        };
        let first = Workload::new("bench", 10, "s");
        let started = std::time::Instant::now();
        let mut last = first.update(0);
        for _ in 0..50_000 {
            last = first.update(0);
        }
        // As fast as a run goes: no more than one update per microsecond, so the clock is ahead.
        while started.elapsed() < std::time::Duration::from_micros(50_001) {
            std::hint::spin_loop();
        }
        let second = Workload::new("bench", 10, "s");
        assert!(created_at(&second.update(0)) > created_at(&last));
    }
}
