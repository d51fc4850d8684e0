//! `colony-averaging` will hold Colony's averaging engine: named tensors laid out in one flat buffer and their
//! schema hash, the compression codecs, partitioning of tensors into parts, load balancing among peers of
//! different bandwidths, the part reducer, the fault-tolerant butterfly all-reduce over
//! [`colony_transports`] streams, and state transfer. It depends on no actor framework and no GPU; the
//! runtime drives it. Nothing is implemented here yet (see `docs/architecture.md`).
