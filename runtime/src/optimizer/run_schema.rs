//! The run's gradient schema, `/colony/run-schema/1`: what a peer that holds no model needs to take part in
//! the gradient rounds (an auxiliary `colony node`): the gradient tensors (names, shapes, codecs), the part
//! size and the target batch size. Every training peer serves the schema it averages with; an auxiliary
//! peer asks the trainers it knows until one answers.
//!
//! The answer is checked as anything from the network: counts and lengths are bounded, codec ids must be
//! known, and shapes must not overflow.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use colony_averaging::codec::{Codec, CodecPolicy};
use colony_averaging::net::Connector;
use colony_averaging::tensor::{Dtype, TensorInfo, TensorRole};
use colony_transports::PeerId;
use colony_transports::rpc::{self, Router, StreamConfig};
use colony_transports::wire::{ProtocolId, WireMessage};

/// Most tensors a schema may name.
pub const MAX_TENSORS: usize = 65_536;
/// Longest tensor name accepted, bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// Most dimensions of one tensor.
pub const MAX_DIMENSIONS: usize = 16;

/// The protocol id, `/colony/run-schema/1`.
pub fn protocol() -> ProtocolId {
    ProtocolId::new("run-schema", 1).expect("a valid protocol name")
}

/// What a peer needs to average gradients with the run's trainers.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSchema {
    /// The trainers' parameter tensors, in their order (the gradient layout follows from them).
    pub tensors: Vec<TensorInfo>,
    /// The codec of each tensor (the trainers' `grad_compression`, resolved per tensor).
    pub codecs: Vec<Codec>,
    /// The all-reduce part size, bytes.
    pub part_size_bytes: usize,
    /// Samples per epoch.
    pub target_batch_size: u64,
}

impl RunSchema {
    /// The schema of gradient rounds over `tensors` compressed with `policy`.
    pub fn new(tensors: &[TensorInfo], policy: &CodecPolicy, part_size_bytes: usize, target_batch_size: u64) -> Self {
        Self {
            codecs: tensors.iter().map(|t| policy.codec_for(t)).collect(),
            tensors: tensors.to_vec(),
            part_size_bytes,
            target_batch_size,
        }
    }

    /// The codec policy that gives each tensor its codec.
    pub fn codec_policy(&self) -> CodecPolicy {
        let codecs: HashMap<String, Codec> = self
            .tensors
            .iter()
            .zip(&self.codecs)
            .map(|(t, c)| (t.name.clone(), *c))
            .collect();
        CodecPolicy::ByName {
            codecs,
            default: Box::new(CodecPolicy::Fixed(Codec::None)),
        }
    }

    fn to_wire(&self) -> WireSchema {
        WireSchema {
            tensors: self
                .tensors
                .iter()
                .zip(&self.codecs)
                .map(|(t, c)| WireTensor {
                    name: t.name.clone(),
                    shape: t.shape.iter().map(|d| *d as u64).collect(),
                    dtype: t.dtype.name().to_string(),
                    codec: c.id(),
                })
                .collect(),
            part_size_bytes: self.part_size_bytes as u64,
            target_batch_size: self.target_batch_size,
        }
    }

    fn from_wire(wire: WireSchema) -> Result<Self, String> {
        if wire.tensors.len() > MAX_TENSORS {
            return Err(format!(
                "{} tensors, more than the {MAX_TENSORS} accepted",
                wire.tensors.len()
            ));
        }
        if wire.tensors.is_empty() {
            return Err("no tensors".into());
        }
        let mut tensors = Vec::with_capacity(wire.tensors.len());
        let mut codecs = Vec::with_capacity(wire.tensors.len());
        let mut names = std::collections::HashSet::new();
        for tensor in &wire.tensors {
            let name = tensor.name.as_str();
            if name.is_empty() || name.len() > MAX_NAME_BYTES {
                return Err(format!("a tensor name of {} bytes (1 to {MAX_NAME_BYTES})", name.len()));
            }
            if !names.insert(name) {
                return Err(format!("tensor `{name}` is named twice"));
            }
            if tensor.shape.len() > MAX_DIMENSIONS {
                return Err(format!("tensor `{name}` has {} dimensions", tensor.shape.len()));
            }
            let mut shape = Vec::with_capacity(tensor.shape.len());
            let mut values: usize = 1;
            for dim in &tensor.shape {
                let dim = usize::try_from(*dim).map_err(|_| format!("tensor `{name}`: dimension too large"))?;
                values = values
                    .checked_mul(dim)
                    .filter(|v| *v <= isize::MAX as usize / 4)
                    .ok_or_else(|| format!("tensor `{name}`: its size overflows"))?;
                shape.push(dim);
            }
            let codec = Codec::from_id(tensor.codec).map_err(|e| format!("tensor `{name}`: {e}"))?;
            let dtype = [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64]
                .into_iter()
                .find(|d| d.name() == tensor.dtype)
                .ok_or_else(|| format!("tensor `{name}`: unknown dtype `{:.32}`", tensor.dtype))?;
            let mut info = TensorInfo::new(name, shape).with_role(TensorRole::Parameter);
            info.dtype = dtype;
            tensors.push(info);
            codecs.push(codec);
        }
        let part_size_bytes = usize::try_from(wire.part_size_bytes)
            .ok()
            .filter(|p| *p >= 1)
            .ok_or("a zero or oversized part size")?;
        let target_batch_size = wire.target_batch_size;
        if target_batch_size == 0 {
            return Err("a target batch size of 0".into());
        }
        Ok(Self {
            tensors,
            codecs,
            part_size_bytes,
            target_batch_size,
        })
    }
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct WireTensor {
    name: String,
    shape: Vec<u64>,
    dtype: String,
    codec: u8,
}

/// The schema, carried rkyv-encoded as the answer's payload (a large model's list may pass the header
/// limit).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct WireSchema {
    tensors: Vec<WireTensor>,
    part_size_bytes: u64,
    target_batch_size: u64,
}

/// The request: empty (the connection says who asks).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct SchemaRequest {}

/// The answer's header: the encoded schema's length follows as the payload.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct SchemaHeader {
    bytes: u64,
}

/// The schema a peer serves: set by its optimizer at start, `None` while it trains no model.
#[derive(Clone, Default)]
pub struct SchemaSlot(Arc<RwLock<Option<Arc<RunSchema>>>>);

impl SchemaSlot {
    /// Serves `schema` from now on.
    pub fn set(&self, schema: RunSchema) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(schema));
    }

    fn get(&self) -> Option<Arc<RunSchema>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Serves the protocol on `router`.
    pub fn register(&self, router: &mut Router) {
        let slot = self.clone();
        router.rpc(protocol(), move |_peer, _request: SchemaRequest, _payload| {
            let schema = slot.get();
            async move {
                let schema = schema.ok_or("this peer trains no model: ask a trainer")?;
                let encoded = schema.to_wire().encode().map_err(|e| e.to_string())?;
                let payload = Bytes::copy_from_slice(&encoded);
                Ok((
                    SchemaHeader {
                        bytes: payload.len() as u64,
                    },
                    payload,
                ))
            }
        });
    }
}

/// Asks `peers` in turn for the run's schema; the first valid answer wins. The error names every peer
/// asked and why it gave none.
pub async fn fetch(connector: &dyn Connector, peers: &[PeerId], timeout: Duration) -> Result<RunSchema, String> {
    if peers.is_empty() {
        return Err("no trainer to ask for the run's schema".into());
    }
    let config = StreamConfig::default();
    let mut failures = Vec::new();
    for peer in peers {
        let answer = async {
            let conn = connector.connect(peer).await.map_err(|e| e.to_string())?;
            let (header, payload) = rpc::call::<SchemaRequest, SchemaHeader>(
                &conn,
                &protocol(),
                &SchemaRequest {},
                Bytes::new(),
                timeout,
                &config,
            )
            .await
            .map_err(|e| e.to_string())?;
            if header.bytes != payload.len() as u64 {
                return Err(format!("announced {} bytes, sent {}", header.bytes, payload.len()));
            }
            let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(payload.len());
            aligned.extend_from_slice(&payload);
            let archived = WireSchema::access_archived(&aligned).map_err(|e| e.to_string())?;
            RunSchema::from_wire(WireSchema::decode_archived(archived).map_err(|e| e.to_string())?)
        };
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(schema)) => return Ok(schema),
            Ok(Err(e)) => failures.push(format!("{peer}: {e}")),
            Err(_) => failures.push(format!("{peer}: no answer within {timeout:?}")),
        }
    }
    Err(format!("no peer gave the run's schema: {}", failures.join("; ")))
}
