//! What every kit connection is opened with.

use std::str::FromStr;
use std::time::Duration;

use participants::kit::database;
use participants::kit::{DatabaseError, PoolSettings};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::database_url;

fn fresh_database() -> PgConnectOptions {
    let name = format!("kit_open_{}", Uuid::new_v4().simple());
    PgConnectOptions::from_str(&database_url())
        .unwrap()
        .database(&name)
}

#[tokio::test]
async fn kit_connections_plan_once_by_index_and_bound_lock_waits() {
    let options = fresh_database();
    let settings = PoolSettings {
        lock_timeout: Duration::from_millis(1234),
        ..PoolSettings::default()
    };
    let pool = database::open(options.clone(), &settings, None, &CancellationToken::new())
        .await
        .unwrap()
        .expect("not shut down")
        .pool;
    let show = |setting: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(&format!("SHOW {setting}"))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    // Each statement planned once, never again per call; no sequential
    // scan plan cached while a table was nearly empty.
    assert_eq!(show("plan_cache_mode").await, "force_generic_plan");
    assert_eq!(show("enable_seqscan").await, "off");
    assert_eq!(show("lock_timeout").await, "1234ms");
    // The kit's own tables are there.
    let inbox: Option<String> = sqlx::query_scalar("SELECT to_regclass('kit_inbox')::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(inbox.as_deref(), Some("kit_inbox"));
    pool.close().await;
    database::drop_database(&options).await.unwrap();
}

#[tokio::test]
async fn a_service_migration_below_the_kits_range_is_refused_before_connecting() {
    let dir = std::env::temp_dir().join(format!("kit_migrations_{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("5_too_low.sql"), "CREATE TABLE too_low (id INT);").unwrap();
    let service = Migrator::new(dir.as_path()).await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let options = fresh_database();
    let refused = database::open(
        options.clone(),
        &PoolSettings::default(),
        Some(service),
        &CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(refused, Err(DatabaseError::ReservedMigrationVersion(5))),
        "{refused:?}"
    );
    // Nothing was created for it.
    let admin = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(options.get_database().unwrap())
            .fetch_one(&admin)
            .await
            .unwrap();
    assert!(!exists);
}
