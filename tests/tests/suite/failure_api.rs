//! Bad input through gRPC, sent to a real orchestrator process while it
//! runs real orders: every request gets the documented code with a message
//! naming the field, nothing of it is persisted, and the orders around it
//! are unaffected (the invariant checker runs at the end).
//!
//! Limits (see docs/RELIABILITY.md): `input_json` at most 64 KiB
//! (INVALID_ARGUMENT beyond), a gRPC request at most 1 MiB (RESOURCE_EXHAUSTED
//! beyond, refused while decoding, before any handler runs),
//! idempotency keys at most 256 bytes, ids in an order at most 128 bytes,
//! at most 100 items, saga ids are UUIDs.

use std::time::Duration;

use saga_proto::v1::{
    CancelSagaRequest, GetSagaRequest, ListSagasRequest, RetrySagaRequest, StartSagaRequest,
    WatchSagaRequest,
};
use saga_tests::{cluster::ClusterOptions, invariants::Expectations};
use serde_json::json;
use tonic::Code;

use crate::failure_support::{SETTLE, cluster, load, seed};

/// Marks every bad request, so the database can be searched for leftovers.
const MARK: &str = "bad-input-marker";

fn start(saga_type: &str, input: String) -> StartSagaRequest {
    StartSagaRequest {
        saga_type: saga_type.to_owned(),
        input_json: input,
        idempotency_key: format!("{MARK}-{}", uuid::Uuid::new_v4()),
        definition_version: 0,
    }
}

fn order_with(items: serde_json::Value) -> String {
    json!({"order_id": MARK, "customer_id": "c-1", "items": items}).to_string()
}

fn item() -> serde_json::Value {
    json!({"sku": "sku-1", "quantity": 1, "unit_price_cents": 100})
}

#[tokio::test]
async fn bad_grpc_input_gets_the_documented_code_and_persists_nothing() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let load = load(&cluster, 20, 5.0, seed("bad input"));
    let mut client = cluster.client(0);

    let long = "x".repeat(129);
    let cases: Vec<(&str, StartSagaRequest, Code, &str)> = vec![
        (
            "invalid JSON",
            start("order_placement", "{not json".into()),
            Code::InvalidArgument,
            "input_json",
        ),
        (
            "JSON that is not an object",
            start("order_placement", "[1, 2]".into()),
            Code::InvalidArgument,
            "input_json",
        ),
        (
            "unknown field",
            start(
                "order_placement",
                json!({"order_id": MARK, "customer_id": "c", "items": [item()], "coupon": "x"})
                    .to_string(),
            ),
            Code::InvalidArgument,
            "input_json.coupon",
        ),
        (
            "wrong type",
            start(
                "order_placement",
                order_with(json!([{"sku": "sku-1", "quantity": "two", "unit_price_cents": 1}])),
            ),
            Code::InvalidArgument,
            "input_json.items[0].quantity",
        ),
        (
            "negative quantity",
            start(
                "order_placement",
                order_with(json!([{"sku": "sku-1", "quantity": -1, "unit_price_cents": 1}])),
            ),
            Code::InvalidArgument,
            "input_json.items[0].quantity",
        ),
        (
            "no items",
            start("order_placement", order_with(json!([]))),
            Code::InvalidArgument,
            "input_json.items",
        ),
        (
            "too many items",
            start("order_placement", order_with(json!(vec![item(); 101]))),
            Code::InvalidArgument,
            "input_json.items",
        ),
        (
            "empty order id",
            start(
                "order_placement",
                json!({"order_id": " ", "customer_id": MARK, "items": [item()]}).to_string(),
            ),
            Code::InvalidArgument,
            "input_json.order_id",
        ),
        (
            "huge order id",
            start(
                "order_placement",
                json!({"order_id": long, "customer_id": MARK, "items": [item()]}).to_string(),
            ),
            Code::InvalidArgument,
            "input_json.order_id",
        ),
        (
            "control characters in an id",
            start(
                "order_placement",
                json!({"order_id": "a\u{7}b", "customer_id": MARK, "items": [item()]}).to_string(),
            ),
            Code::InvalidArgument,
            "input_json.order_id",
        ),
        (
            "input over 64 KiB",
            start(
                "order_placement",
                json!({"order_id": MARK, "pad": "x".repeat(70_000)}).to_string(),
            ),
            Code::InvalidArgument,
            "input_json",
        ),
        (
            "empty saga type",
            start("", order_with(json!([item()]))),
            Code::InvalidArgument,
            "saga_type",
        ),
        (
            "huge saga type",
            start(&"t".repeat(5000), order_with(json!([item()]))),
            Code::InvalidArgument,
            "saga_type",
        ),
        (
            "unknown saga type",
            start("refund_request", order_with(json!([item()]))),
            Code::NotFound,
            "saga_type",
        ),
        (
            "unknown version",
            StartSagaRequest {
                definition_version: 99,
                ..start("order_placement", order_with(json!([item()])))
            },
            Code::NotFound,
            "definition_version",
        ),
        (
            "huge idempotency key",
            StartSagaRequest {
                idempotency_key: format!("{MARK}{}", "k".repeat(300)),
                ..start("order_placement", order_with(json!([item()])))
            },
            Code::InvalidArgument,
            "idempotency_key",
        ),
    ];
    for (what, request, code, field) in cases {
        let status = client.start_saga(request).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "{what}: {:?} should name {field}",
            status.message()
        );
    }
    let huge = start(
        "order_placement",
        format!(
            "{{\"order_id\": \"{MARK}\", \"pad\": \"{}\"}}",
            "x".repeat(2 << 20)
        ),
    );
    let status = client.start_saga(huge).await.expect_err("over 1 MiB");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    for bad_id in [
        "",
        "not-a-uuid",
        "01a1fe52-7cb7-7711-b322",
        &"9".repeat(5000),
    ] {
        let id = bad_id.to_owned();
        let checks = [
            client
                .get_saga(GetSagaRequest {
                    saga_id: id.clone(),
                })
                .await
                .map(|_| ()),
            client
                .cancel_saga(CancelSagaRequest {
                    saga_id: id.clone(),
                    reason: String::new(),
                })
                .await
                .map(|_| ()),
            client
                .retry_saga(RetrySagaRequest {
                    saga_id: id.clone(),
                })
                .await
                .map(|_| ()),
            client
                .watch_saga(WatchSagaRequest {
                    saga_id: id.clone(),
                })
                .await
                .map(|_| ()),
        ];
        for result in checks {
            let status = result.expect_err("a bad saga id is refused");
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{bad_id:.40}: {status:?}"
            );
            assert!(
                status.message().starts_with("saga_id"),
                "{}",
                status.message()
            );
        }
    }
    let unknown = uuid::Uuid::new_v4().to_string();
    let status = client
        .get_saga(GetSagaRequest {
            saga_id: unknown.clone(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .cancel_saga(CancelSagaRequest {
            saga_id: unknown,
            reason: "x".repeat(2000),
        })
        .await
        .expect_err("reason too long");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    for request in [
        ListSagasRequest {
            page_token: "garbage!".into(),
            ..Default::default()
        },
        ListSagasRequest {
            state: 42,
            ..Default::default()
        },
    ] {
        let status = client.list_sagas(request).await.expect_err("bad listing");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }

    // Nothing of the above was written, while the real orders went on.
    assert!(load.wait_started(20, Duration::from_secs(60)).await);
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sagas WHERE input LIKE '%' || $1 || '%' OR idempotency_key LIKE $1 || '%'",
    )
    .bind(MARK)
    .fetch_one(&cluster.pool)
    .await
    .expect("read sagas");
    assert_eq!(leftovers, 0, "bad requests persisted nothing");
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("bad input: {report}");
    assert_eq!(report.sagas, 20);
    report.assert_ok();
}
