//! The worker's devices: parsing a `--devices` list, and what the CUDA driver says about each
//! GPU (name, memory).
//!
//! The CUDA driver is reached through cudarc's driver API, loaded at run time
//! (`libcuda.so.1`): on a machine without it every function here returns an error or an empty
//! answer; none panics.

use std::sync::OnceLock;

use tch::Device;

/// Why a device list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceListError {
    /// Nothing was listed.
    #[error("the device list is empty: give `cpu`, `cpu:0,cpu:1` or `cuda:0,cuda:1`")]
    Empty,
    /// An item is neither `cpu`, `cpu:N`, `cuda` nor `cuda:N`.
    #[error("device `{0}` is not one of `cpu`, `cpu:N`, `cuda:N`")]
    UnknownForm(String),
    /// A CUDA index that libtorch does not see.
    #[error("device `{item}` does not exist: this machine has {count} CUDA device(s) visible to libtorch")]
    CudaOutOfRange { item: String, count: usize },
    /// The same device twice.
    #[error("device `{0}` is listed twice")]
    Duplicate(String),
    /// CPU slots and CUDA devices in one list.
    #[error("`{0}` mixes CPU slots and CUDA devices; a worker trains on one or the other")]
    Mixed(String),
}

/// Parses a device list — `cpu`, `cpu:0,cpu:1` (CPU slots), `cuda:0,cuda:1` — into
/// `(id, device)` pairs in the given order, ids normalised (`cpu` → `cpu:0`, `cuda` →
/// `cuda:0`). CUDA indices are checked against the devices libtorch sees.
pub fn parse_devices(list: &str) -> Result<Vec<(String, Device)>, DeviceListError> {
    parse_devices_with(list, tch::Cuda::device_count().max(0) as usize)
}

/// [`parse_devices`] against `cuda_count` visible CUDA devices.
pub fn parse_devices_with(list: &str, cuda_count: usize) -> Result<Vec<(String, Device)>, DeviceListError> {
    let mut out: Vec<(String, Device)> = Vec::new();
    for item in list.split(',').map(str::trim) {
        if item.is_empty() {
            if list.trim().is_empty() {
                return Err(DeviceListError::Empty);
            }
            return Err(DeviceListError::UnknownForm(String::new()));
        }
        let lower = item.to_ascii_lowercase();
        let index = |s: &str| -> Result<usize, DeviceListError> {
            let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if !digits {
                return Err(DeviceListError::UnknownForm(item.to_string()));
            }
            s.parse::<usize>().map_err(|_| DeviceListError::UnknownForm(item.to_string()))
        };
        let (id, device) = match lower.split_once(':') {
            None if lower == "cpu" => ("cpu:0".to_string(), Device::Cpu),
            None if lower == "cuda" => ("cuda:0".to_string(), Device::Cuda(0)),
            Some(("cpu", n)) => (format!("cpu:{}", index(n)?), Device::Cpu),
            Some(("cuda", n)) => {
                let i = index(n)?;
                (format!("cuda:{i}"), Device::Cuda(i))
            }
            _ => return Err(DeviceListError::UnknownForm(item.to_string())),
        };
        if let Device::Cuda(i) = device
            && i >= cuda_count
        {
            return Err(DeviceListError::CudaOutOfRange { item: item.to_string(), count: cuda_count });
        }
        if out.iter().any(|(seen, _)| *seen == id) {
            return Err(DeviceListError::Duplicate(id));
        }
        out.push((id, device));
    }
    let cpu = out.iter().filter(|(_, d)| *d == Device::Cpu).count();
    if cpu != 0 && cpu != out.len() {
        return Err(DeviceListError::Mixed(list.trim().to_string()));
    }
    Ok(out)
}

/// What the CUDA driver says about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    /// Ordinal (`cuda:N`), as libtorch numbers the visible devices.
    pub index: usize,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Total device memory.
    pub memory_bytes: u64,
}

fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    // cudarc panics when a driver symbol is missing; an old or odd driver must not take the
    // worker down.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| Err(format!("{what} panicked")))
}

/// Loads and initialises the CUDA driver (once per process): `Ok` when `libcuda` is present
/// and `cuInit` succeeded, otherwise why not.
pub fn driver_available() -> Result<(), String> {
    static DRIVER: OnceLock<Result<(), String>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            guarded("loading the CUDA driver", || {
                // SAFETY: only tries to dlopen the driver library by its usual names.
                if !unsafe { cudarc::driver::sys::is_culib_present() } {
                    return Err("no CUDA driver library (libcuda.so.1) on this machine".into());
                }
                cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e}"))
            })
        })
        .clone()
}

/// Name and total memory of every device the CUDA driver sees (in its order, which is
/// libtorch's: both honour `CUDA_VISIBLE_DEVICES`), or why they cannot be listed.
pub fn cuda_devices() -> Result<Vec<CudaDeviceInfo>, String> {
    driver_available()?;
    guarded("querying CUDA devices", || {
        use cudarc::driver::result::device;
        let count = device::get_count().map_err(|e| format!("cuDeviceGetCount: {e}"))?;
        (0..count.max(0))
            .map(|i| {
                let dev = device::get(i).map_err(|e| format!("cuDeviceGet({i}): {e}"))?;
                let name = device::get_name(dev).map_err(|e| format!("cuDeviceGetName({i}): {e}"))?;
                // SAFETY: `dev` came from cuDeviceGet.
                let memory = unsafe { device::total_mem(dev) }.map_err(|e| format!("cuDeviceTotalMem({i}): {e}"))?;
                Ok(CudaDeviceInfo { index: i as usize, name, memory_bytes: memory as u64 })
            })
            .collect()
    })
}

/// The CPU's model name from `/proc/cpuinfo` (`None` where there is none).
pub fn cpu_model_name() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &str, cuda: usize) -> Vec<String> {
        parse_devices_with(list, cuda).unwrap().into_iter().map(|(id, _)| id).collect()
    }

    #[test]
    fn device_lists_parse() {
        assert_eq!(parse_devices_with("cpu", 0).unwrap(), vec![("cpu:0".to_string(), Device::Cpu)]);
        assert_eq!(ids("cpu:0, cpu:1", 0), ["cpu:0", "cpu:1"]);
        assert_eq!(ids("CPU:3", 0), ["cpu:3"]);
        let cuda = parse_devices_with("cuda:1,cuda:0", 2).unwrap();
        assert_eq!(cuda, vec![("cuda:1".to_string(), Device::Cuda(1)), ("cuda:0".to_string(), Device::Cuda(0))]);
        assert_eq!(ids("cuda", 1), ["cuda:0"]);
    }

    #[test]
    fn bad_device_lists_say_what_is_wrong() {
        let err = |l: &str, cuda| parse_devices_with(l, cuda).unwrap_err();
        assert_eq!(err("", 0), DeviceListError::Empty);
        assert_eq!(err("  ", 0), DeviceListError::Empty);
        assert_eq!(err("gpu:0", 2), DeviceListError::UnknownForm("gpu:0".into()));
        assert_eq!(err("cuda:x", 2), DeviceListError::UnknownForm("cuda:x".into()));
        assert_eq!(err("cuda:-1", 2), DeviceListError::UnknownForm("cuda:-1".into()));
        assert_eq!(err("cpu,,cpu:1", 0), DeviceListError::UnknownForm(String::new()));
        assert_eq!(err("cuda:2", 2), DeviceListError::CudaOutOfRange { item: "cuda:2".into(), count: 2 });
        assert_eq!(err("cuda:0", 0), DeviceListError::CudaOutOfRange { item: "cuda:0".into(), count: 0 });
        assert_eq!(err("cuda:0,cuda:0", 2), DeviceListError::Duplicate("cuda:0".into()));
        assert_eq!(err("cpu,cpu:0", 0), DeviceListError::Duplicate("cpu:0".into()));
        assert_eq!(err("cpu,cuda:0", 1), DeviceListError::Mixed("cpu,cuda:0".into()));
        let text = err("cuda:3", 1).to_string();
        assert!(text.contains("cuda:3") && text.contains("1 CUDA device"), "{text}");
    }

    #[test]
    fn the_driver_query_never_panics() {
        match cuda_devices() {
            Ok(devices) => {
                for d in devices {
                    assert!(!d.name.is_empty() && d.memory_bytes > 0, "{d:?}");
                }
            }
            Err(why) => assert!(!why.is_empty()),
        }
    }
}
