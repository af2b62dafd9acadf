//! Resuming a campaign (C-6): a worker with `run.resume` loads the newest committed checkpoint
//! in its run directory that verifies, whatever world wrote it, before it registers.

use anyhow::{bail, Result};
use phalanx_actors::Setup;
use phalanx_checkpoint::sharded;
use phalanx_model::io as model_io;
use phalanx_runtime::metrics::{ResumeLine, SkippedCheckpoint};
use std::path::Path;
use tracing::{info, warn};

/// Loads the newest committed checkpoint under `run_dir/checkpoints` that verifies into
/// `setup`; newer ones that do not are named with why. None when the campaign has no
/// checkpoint yet (its first job starts from step 0).
pub fn load_newest(run_dir: &Path, setup: &mut Setup) -> Result<Option<ResumeLine>> {
    let root = run_dir.join("checkpoints");
    let (found, skipped) = sharded::newest_valid(&root, None);
    let skipped: Vec<SkippedCheckpoint> = skipped
        .into_iter()
        .map(|(dir, why)| {
            warn!(checkpoint = %dir.display(), %why, "skipping a checkpoint that does not verify");
            SkippedCheckpoint {
                checkpoint: dir.display().to_string(),
                why: why.to_string(),
            }
        })
        .collect();
    let Some(v) = found else {
        if !skipped.is_empty() {
            bail!(
                "run.resume: no committed checkpoint in {} verifies ({} skipped, the newest: {}); \
                 restore one, or start the campaign again without run.resume in a new run.dir",
                root.display(),
                skipped.len(),
                skipped[0].why
            );
        }
        info!(dir = %root.display(), "run.resume: no checkpoint yet; starting from step 0");
        return Ok(None);
    };
    let step = model_io::restore_sharded(&v, &mut setup.trainer)?;
    let world = v.manifest.shards.as_ref().map_or(0, |s| s.world);
    info!(step, written_by = world, checkpoint = %v.dir.display(), "resumed from a checkpoint");
    Ok(Some(ResumeLine {
        resume: true,
        step,
        checkpoint: v.dir.display().to_string(),
        world_size: 0,
        skipped,
        unix_ms: 0,
    }))
}
