//! Which instants the service keeps and serves: the one rule for time.
//!
//! Every time the API emits is a `google.protobuf.Timestamp`, which only holds
//! 0001-01-01T00:00:00Z ..= 9999-12-31T23:59:59.999999999Z with nanoseconds below 10^9. chrono
//! holds more: years 0 and below or above 9999, and leap seconds (`23:59:60`, kept as the 59th
//! second with nanoseconds of 10^9 and more). A value the API cannot serve breaks every JSON
//! client of the account (grpcurl, protobuf's `json_format`: "ns out of range") on GetProfile
//! and on ListProfiles for the whole account.
//!
//! So, at the door ([`event_time`], used when a webhook is validated): a leap second becomes
//! the last nanosecond of the second before it (`23:59:59.999999999`: it sorts after every
//! other instant of that second, as the leap second did, and before the next second), and a
//! time outside 0001..=9999 is refused. On the way out ([`servable`], what the gRPC adapter's
//! one Timestamp converter uses), whatever is stored is brought into range the same way, so
//! records written before this rule (a leap second journaled as it came) still recover
//! unchanged, and are still served valid.

use chrono::{DateTime, Timelike, Utc};

use super::EventTime;

/// The earliest instant a protobuf Timestamp holds: 0001-01-01T00:00:00Z, in Unix seconds.
pub const EARLIEST_SECONDS: i64 = -62_135_596_800;
/// The last second a protobuf Timestamp holds: 9999-12-31T23:59:59Z, in Unix seconds.
pub const LATEST_SECONDS: i64 = 253_402_300_799;
/// The largest nanoseconds a protobuf Timestamp holds.
const MAX_NANOS: u32 = 999_999_999;

/// A time outside 0001-01-01T00:00:00Z ..= 9999-12-31T23:59:59.999999999Z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999999Z")]
pub struct OutOfRange;

/// `at` as the service keeps it: a leap second becomes `23:59:59.999999999` of the same day,
/// and a time the API could not serve is refused.
pub fn event_time(at: DateTime<Utc>) -> Result<EventTime, OutOfRange> {
    if !(EARLIEST_SECONDS..=LATEST_SECONDS).contains(&at.timestamp()) {
        return Err(OutOfRange);
    }
    Ok(without_leap_second(at))
}

/// Unix seconds and nanoseconds that a protobuf Timestamp holds, for any `at`: exact for every
/// time [`event_time`] keeps; a leap second is served as the last nanosecond of its second, a
/// time before year 1 as its first instant and after year 9999 as its last.
pub fn servable(at: DateTime<Utc>) -> (i64, u32) {
    let at = without_leap_second(at);
    match at.timestamp() {
        seconds if seconds < EARLIEST_SECONDS => (EARLIEST_SECONDS, 0),
        seconds if seconds > LATEST_SECONDS => (LATEST_SECONDS, MAX_NANOS),
        seconds => (seconds, at.timestamp_subsec_nanos()),
    }
}

fn without_leap_second(at: DateTime<Utc>) -> DateTime<Utc> {
    if at.nanosecond() <= MAX_NANOS {
        return at;
    }
    // chrono accepts any nanosecond below 2 * 10^9 here, so this cannot fail.
    at.with_nanosecond(MAX_NANOS).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parse(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_leap_second_becomes_the_last_nanosecond_before_it() {
        for leap in [
            "2016-12-31T23:59:60Z",
            "2016-12-31T23:59:60.5Z",
            "2016-12-31T23:59:60.999999999Z",
        ] {
            let kept = event_time(parse(leap)).unwrap();
            assert_eq!(kept, parse("2016-12-31T23:59:59.999999999Z"), "{leap}");
        }
        // In another offset, the leap second is still the UTC one.
        let kept = event_time(parse("2016-12-31T23:59:60.25+01:30")).unwrap();
        assert_eq!(kept, parse("2016-12-31T22:29:59.999999999Z"));
        let ordinary = parse("2016-12-31T23:59:59.5Z");
        assert_eq!(event_time(ordinary), Ok(ordinary));
    }

    #[test]
    fn times_outside_years_1_to_9999_are_refused() {
        for outside in [
            "0000-01-01T00:00:00Z",
            "0000-12-31T23:59:59.999999999Z",
            "0001-01-01T00:00:00+00:01",
            "9999-12-31T23:59:59.999999999-00:01",
        ] {
            assert_eq!(event_time(parse(outside)), Err(OutOfRange), "{outside}");
        }
        for inside in [
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            "9999-12-31T23:59:60.5Z",
        ] {
            assert!(event_time(parse(inside)).is_ok(), "{inside}");
        }
    }

    // chrono's whole range, including leap seconds (nanoseconds up to 2 * 10^9 - 1).
    fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
        let min = DateTime::<Utc>::MIN_UTC.timestamp();
        let max = DateTime::<Utc>::MAX_UTC.timestamp();
        prop_oneof![
            (min..=max, 0u32..2_000_000_000),
            (
                EARLIEST_SECONDS - 2..EARLIEST_SECONDS + 2,
                0u32..2_000_000_000
            ),
            (LATEST_SECONDS - 2..LATEST_SECONDS + 2, 0u32..2_000_000_000),
        ]
        .prop_filter_map("not a time chrono holds", |(seconds, nanos)| {
            DateTime::from_timestamp(seconds, nanos)
        })
    }

    proptest! {
        #[test]
        fn every_time_is_served_as_a_valid_timestamp(at in any_time()) {
            let (seconds, nanos) = servable(at);
            prop_assert!((EARLIEST_SECONDS..=LATEST_SECONDS).contains(&seconds));
            prop_assert!(nanos <= MAX_NANOS);
        }

        #[test]
        fn kept_times_are_served_exactly_and_in_order(a in any_time(), b in any_time()) {
            let (Ok(a), Ok(b)) = (event_time(a), event_time(b)) else {
                return Ok(());
            };
            prop_assert_eq!(servable(a), (a.timestamp(), a.timestamp_subsec_nanos()));
            prop_assert_eq!(servable(a).cmp(&servable(b)), a.cmp(&b));
        }
    }
}
