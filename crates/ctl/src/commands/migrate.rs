//! `devsyncctl migrate`.

use anyhow::Context;
use devsync_runtime::CommonSettings;

/// Applies pending migrations and says what it did.
pub async fn run(settings: &CommonSettings) -> anyhow::Result<()> {
    let applied = devsync_store::migrate(settings.database.url.expose())
        .await
        .context("migrate")?;
    let latest = devsync_store::known_migrations()
        .last()
        .map(|(v, _)| *v)
        .unwrap_or(0);
    if applied.is_empty() {
        println!("schema is current (version {latest})");
    }
    for migration in &applied {
        println!("applied V{} {}", migration.version, migration.name);
    }
    Ok(())
}
