use crate::{ModelError, Result};
use tch::Device;

/// Variables in which launchers give a process its rank on its node, in the order they are
/// read: torchrun, Slurm, PBS (PALS), MPICH/Hydra, Open MPI.
pub const LOCAL_RANK_VARS: [&str; 5] = [
    "LOCAL_RANK",
    "SLURM_LOCALID",
    "PALS_LOCAL_RANKID",
    "PMI_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
];

/// Resolves the config's `device` string. `auto` picks CUDA when libtorch sees a GPU; with
/// several GPUs each rank takes `cuda:<local rank>` (see [`cuda_index`]).
pub fn resolve_device(name: &str) -> Result<Device> {
    let gpus = if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    };
    resolve_device_with(name, gpus, &|k| std::env::var(k).ok())
}

/// `resolve_device` with the GPU count and the environment given (for tests).
pub fn resolve_device_with(
    name: &str,
    gpus: usize,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Device> {
    match name {
        "auto" if gpus == 0 => Ok(Device::Cpu),
        "auto" | "cuda" if gpus > 0 => Ok(Device::Cuda(cuda_index(gpus, env)?)),
        "cuda" => Err(ModelError::NoCuda),
        "cpu" => Ok(Device::Cpu),
        other => Err(ModelError::UnknownDevice(other.to_string())),
    }
}

/// The GPU of this process: its local rank when several GPUs are visible (one rank per GPU, as
/// torchrun and the schedulers place them); 0 when one is (the scheduler bound it already).
pub fn cuda_index(gpus: usize, env: &dyn Fn(&str) -> Option<String>) -> Result<usize> {
    if gpus <= 1 {
        return Ok(0);
    }
    for var in LOCAL_RANK_VARS {
        let Some(value) = env(var) else { continue };
        let local_rank: usize = value.trim().parse().map_err(|_| ModelError::BadLocalRank {
            var,
            value: value.clone(),
        })?;
        if local_rank >= gpus {
            return Err(ModelError::TooFewGpus {
                local_rank,
                var,
                gpus,
            });
        }
        return Ok(local_rank);
    }
    Ok(0)
}

pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Sets libtorch's intra-op threads (0 = one per core) and returns how many it uses.
pub fn set_threads(threads: usize) -> usize {
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    tch::set_num_threads(n as i32);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn each_launchers_local_rank_picks_the_gpu() {
        for var in LOCAL_RANK_VARS {
            let pairs = [(var, "3")];
            let e = env(&pairs);
            assert_eq!(
                resolve_device_with("auto", 4, &e).unwrap(),
                Device::Cuda(3),
                "{var}"
            );
            assert_eq!(
                resolve_device_with("cuda", 4, &e).unwrap(),
                Device::Cuda(3),
                "{var}"
            );
        }
        // torchrun's LOCAL_RANK wins over the scheduler's.
        let e = env(&[("SLURM_LOCALID", "0"), ("LOCAL_RANK", "2")]);
        assert_eq!(resolve_device_with("auto", 4, &e).unwrap(), Device::Cuda(2));
    }

    #[test]
    fn one_visible_gpu_or_none() {
        let e = env(&[("LOCAL_RANK", "5")]);
        assert_eq!(resolve_device_with("auto", 1, &e).unwrap(), Device::Cuda(0));
        assert_eq!(resolve_device_with("auto", 0, &e).unwrap(), Device::Cpu);
        assert!(matches!(
            resolve_device_with("cuda", 0, &e),
            Err(ModelError::NoCuda)
        ));
        assert_eq!(resolve_device_with("cpu", 8, &e).unwrap(), Device::Cpu);
        let none: [(&str, &str); 0] = [];
        assert_eq!(
            resolve_device_with("auto", 4, &env(&none)).unwrap(),
            Device::Cuda(0)
        );
    }

    #[test]
    fn bad_local_ranks_say_what_to_do() {
        let e = env(&[("SLURM_LOCALID", "6")]);
        let err = resolve_device_with("auto", 4, &e).unwrap_err().to_string();
        assert!(err.contains("at most 4 ranks per node"), "{err}");
        let e = env(&[("LOCAL_RANK", "x")]);
        let err = resolve_device_with("auto", 2, &e).unwrap_err().to_string();
        assert!(err.contains("LOCAL_RANK"), "{err}");
    }
}
