//! `colony-offload` will hold Colony's host and device memory: page-locked host buffers (or aligned heap
//! buffers where no CUDA driver exists), device buffers, one CUDA copy stream per direction with events that
//! the Offload actor polls, and the CPU optimizer kernels (SGD, Adam/AdamW, LAMB) over flat `f32` buffers.
//! It depends on no actor framework. Nothing is implemented here yet (see `docs/architecture.md`).
