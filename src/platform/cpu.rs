//! The CPU features ONNX Runtime picks its kernels by, and the variant advice
//! that follows from them.
//!
//! ONNX Runtime's CPU kernels (MLAS) are chosen at load by CPU features, so
//! a variant's speed depends on the machine: the 8-bit `q8` variant
//! (MatMulNBits with int8 compute) is fast only where the CPU has int8
//! dot-product instructions (AVX-512 VNNI, AVX-VNNI); without them it is
//! slower than f32 (measured on an AVX2-only AMD EPYC Zen 3: 425 ms per
//! 45-token turn vs 385 ms in f32). Its numbers differ per CPU too, which is
//! why tests hold quantised variants in cosine, never in bits. f32 and fp16
//! are exact on every CPU measured (see `tests/python/test_model.py`).
//!
//! The server logs the features and the advice at start-up; it never changes
//! the variant served.

use std::fmt;

/// The x86-64 features that decide ONNX Runtime's kernels for our variants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// AVX2 (256-bit integer SIMD): MLAS's AVX2 kernels.
    pub avx2: bool,
    /// FMA3: the f32 GEMM kernel on AVX2 machines.
    pub fma: bool,
    /// AVX-512 Foundation: MLAS's AVX-512 kernels.
    pub avx512f: bool,
    /// AVX-512 VNNI: int8 dot products in 512-bit registers.
    pub avx512_vnni: bool,
    /// AVX-VNNI: int8 dot products in 256-bit registers (no AVX-512 needed).
    pub avx_vnni: bool,
    /// AMX int8 tiles (from `/proc/cpuinfo`; std cannot detect it on stable Rust).
    pub amx_int8: bool,
}

impl CpuFeatures {
    /// The features of the CPU this process runs on.
    pub fn detect() -> CpuFeatures {
        #[cfg(target_arch = "x86_64")]
        {
            CpuFeatures {
                avx2: std::arch::is_x86_feature_detected!("avx2"),
                fma: std::arch::is_x86_feature_detected!("fma"),
                avx512f: std::arch::is_x86_feature_detected!("avx512f"),
                avx512_vnni: std::arch::is_x86_feature_detected!("avx512vnni"),
                avx_vnni: std::arch::is_x86_feature_detected!("avxvnni"),
                amx_int8: proc_cpuinfo_has("amx_int8"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuFeatures::default()
        }
    }

    /// Whether the CPU has int8 dot-product instructions ONNX Runtime uses for
    /// MatMulNBits at accuracy level 4 (the `q8` and `q4` variants).
    pub fn int8_dot(&self) -> bool {
        self.avx512_vnni || self.avx_vnni
    }

    /// The fastest variant known to stay within cosine 0.999 of f32 on this
    /// CPU, and why.
    pub fn advice(&self) -> VariantAdvice {
        if self.int8_dot() {
            VariantAdvice {
                variant: "q8",
                reason: "this CPU has int8 dot-product instructions (VNNI): q8 measured 1.5-1.7x faster \
                         than f32 per turn on AVX-512 VNNI machines (AMD EPYC, Intel Sapphire Rapids), at \
                         cosine >= 0.999 of f32",
            }
        } else {
            VariantAdvice {
                variant: "fp16",
                reason: "this CPU has no VNNI, so q8 is slower than f32 here (measured on an AVX2-only CPU: \
                         425 vs 385 ms per 45-token turn); fp16 ran at about f32's speed (354 ms) with half \
                         the KV memory, at cosine >= 0.99998 of f32",
            }
        }
    }
}

impl fmt::Display for CpuFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            ("avx2", self.avx2),
            ("fma", self.fma),
            ("avx512f", self.avx512f),
            ("avx512_vnni", self.avx512_vnni),
            ("avx_vnni", self.avx_vnni),
            ("amx_int8", self.amx_int8),
        ];
        let present: Vec<&str> = names.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect();
        if present.is_empty() {
            write!(f, "none of avx2/fma/avx512f/vnni/amx")
        } else {
            write!(f, "{}", present.join(" "))
        }
    }
}

/// Which variant to serve for speed on this CPU (see [`CpuFeatures::advice`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VariantAdvice {
    /// The variant's name, as `make serve SERVE_VARIANT=` takes it.
    pub variant: &'static str,
    /// Why, in one sentence.
    pub reason: &'static str,
}

impl VariantAdvice {
    /// The file `prepare.py` writes the variant to.
    pub fn file(&self) -> String {
        if self.variant == "f32" {
            "model.onnx".to_string()
        } else {
            format!("model_{}.onnx", self.variant)
        }
    }
}

/// The CPU model name, from `/proc/cpuinfo` where there is one.
pub fn model_name() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

#[cfg(target_arch = "x86_64")]
fn proc_cpuinfo_has(flag: &str) -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == flag))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// VNNI (either kind) advises q8; a CPU without it advises fp16, never q8.
    #[test]
    fn advice_follows_vnni() {
        let avx2_only = CpuFeatures {
            avx2: true,
            fma: true,
            ..CpuFeatures::default()
        };
        assert_eq!(avx2_only.advice().variant, "fp16");
        assert_eq!(avx2_only.advice().file(), "model_fp16.onnx");
        let avx512_vnni = CpuFeatures {
            avx512f: true,
            avx512_vnni: true,
            ..avx2_only
        };
        assert_eq!(avx512_vnni.advice().variant, "q8");
        let avx_vnni = CpuFeatures {
            avx_vnni: true,
            ..avx2_only
        };
        assert_eq!(avx_vnni.advice().variant, "q8");
        assert_eq!(avx_vnni.to_string(), "avx2 fma avx_vnni");
    }
}
