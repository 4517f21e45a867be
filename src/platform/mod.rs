//! What the server learns from the machine it runs on: where ONNX Runtime
//! is ([`onnxruntime`]), which CPU features its kernels will use ([`cpu`]),
//! how much memory there is ([`memory`]). Nothing here knows about models
//! or conversations.

pub mod cpu;
pub mod memory;
pub mod onnxruntime;
