//! WatchProfiles at fan-out: one encoding of a change shared by the subscribers that want the
//! same shape, each subscriber still getting exactly the message its request asks for.

use profile_state::pb;
use serde_json::json;

use crate::common::{TestService, at, profile_updated};
use crate::watch::{next_change, synced, watch};

/// What a subscriber asks: a field filter and whether it wants `previous`.
fn request(fields: &[&str], include_previous: bool) -> pb::WatchProfilesRequest {
    pb::WatchProfilesRequest {
        client_id: "2155".into(),
        fields: fields.iter().map(|field| (*field).into()).collect(),
        include_previous,
        ..Default::default()
    }
}

#[tokio::test]
async fn subscribers_of_one_change_get_the_shape_each_asked_for() {
    let service = TestService::start().await;
    let mut tier_only = watch(&service, request(&["tier_name"], false)).await;
    let mut points_with_previous = watch(&service, request(&["total_points"], true)).await;
    let mut all_with_previous = watch(&service, request(&[], true)).await;
    let mut all_plain = watch(&service, request(&[], false)).await;
    for stream in [
        &mut tier_only,
        &mut points_with_previous,
        &mut all_with_previous,
        &mut all_plain,
    ] {
        assert_eq!(synced(stream).await, 0);
    }
    service
        .update(&profile_updated("c", &at(1), json!({"total_points": 1})))
        .await; // 1: created
    service
        .update(&profile_updated("c", &at(2), json!({"tier_name": "gold"})))
        .await; // 2: tier
    service
        .update(&profile_updated("c", &at(3), json!({"total_points": 5})))
        .await; // 3: points

    let tier = next_change(&mut tier_only).await;
    assert_eq!(tier.revision, 2);
    assert_eq!(tier.changed_fields, vec!["tier_name".to_owned()]);
    assert_eq!(tier.previous, None, "previous only when asked");
    let tier_change = tier.tier_change.as_ref().expect("a tier change");
    assert_eq!(tier_change.to_name, "gold");

    let created = next_change(&mut points_with_previous).await;
    let points = next_change(&mut points_with_previous).await;
    assert_eq!((created.revision, points.revision), (1, 3));
    assert_eq!(created.previous, None, "a created profile has no previous");
    let previous = points.previous.as_ref().expect("previous when asked");
    assert_eq!(previous.total_points, Some(1));
    assert_eq!(previous.tier_name.as_deref(), Some("gold"));
    assert_eq!(points.profile.as_ref().unwrap().total_points, Some(5));
    assert_eq!(points.points_delta.as_ref().map(|d| d.total), Some(4));

    let mut with_previous = Vec::new();
    let mut plain = Vec::new();
    for _ in 0..3 {
        with_previous.push(next_change(&mut all_with_previous).await);
        plain.push(next_change(&mut all_plain).await);
    }
    // The same change in the same shape is the same message, whatever the filter.
    assert_eq!(with_previous[0], created);
    assert_eq!(with_previous[2], points);
    assert_eq!(with_previous[1].previous.as_ref().unwrap().tier_name, None);
    // The plain shape is the same message without `previous`.
    for (plain, mut full) in plain.into_iter().zip(with_previous) {
        full.previous = None;
        assert_eq!(plain, full);
    }
    // The tier watcher's profile is the one the points change replaced.
    assert_eq!(tier.profile, points.previous);
    service.stop().await;
}
