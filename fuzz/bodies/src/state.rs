//! Saved state: the migration stream, the snapshot container and its
//! sections, the memory file's header.

use std::io::Cursor;

use godwit_migration::format::{Container, ContainerWriter, Encoding, SectionKind};
use godwit_migration::memory_file::decode_header_bytes;
use godwit_migration::protocol::{
    decode_runs, read_message, write_message, ChannelHello, Hello, HelloReply, Kind, Message,
    Resumed, RoundEnd,
};
use godwit_vmm::persist::snapshot::{read_saved, KNOWN_SECTIONS};

use crate::input::Input;

/// Kinds a structured input can name, by index (wrapping); the last is one
/// no godwit knows.
const KINDS: [u16; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0x7777];

/// What a migration destination receives. The first byte picks the form
/// of the rest: even, the raw stream; odd, a list of `(kind u8, len u16,
/// payload)` that is framed here with valid checksums, so that the fuzzer
/// reaches the payload decoders without having to forge CRCs.
pub fn migration_stream(data: &[u8]) {
    let mut input = Input::new(data);
    let stream = if input.u8() & 1 == 0 {
        input.rest().to_vec()
    } else {
        let mut stream = Vec::new();
        while !input.is_empty() {
            let kind = KINDS[usize::from(input.u8()) % KINDS.len()];
            let len = usize::from(input.u16());
            let payload = input.bytes(len);
            frame_message(&mut stream, kind, payload);
        }
        stream
    };
    let mut reader = Cursor::new(stream);
    while let Ok(message) = read_message(&mut reader) {
        receive(&message);
    }
}

/// Writes one message of wire kind `kind` (which may be unknown).
fn frame_message(stream: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    match known_kind(kind) {
        Some(kind) => {
            let _ = write_message(stream, kind, payload);
        }
        None => {
            // The writer only takes known kinds: frame an unknown one by
            // patching the kind of a valid header.
            let at = stream.len();
            let _ = write_message(stream, Kind::Complete, payload);
            if let Some(field) = stream.get_mut(at + 6..at + 8) {
                field.copy_from_slice(&kind.to_le_bytes());
            }
        }
    }
}

fn known_kind(kind: u16) -> Option<Kind> {
    Kind::from_u16(kind)
}

/// Decodes a message as the destination (or, for the replies, the source)
/// would.
fn receive(message: &Message) {
    match message.kind {
        Kind::Pages | Kind::ZeroPages => {
            let with_data = message.kind == Kind::Pages;
            if let Ok((runs, data)) = decode_runs(message.kind, &message.payload, with_data) {
                // What the destination relies on: the runs cover exactly
                // the data, without wrapping.
                let total = runs
                    .iter()
                    .map(|r| u64::from(r.pages) * godwit_migration::protocol::PAGE_SIZE)
                    .try_fold(0u64, u64::checked_add);
                if with_data {
                    assert_eq!(total, Some(data.len() as u64), "runs match their data");
                } else {
                    assert!(
                        total.is_some() && data.is_empty(),
                        "zero runs carry no data"
                    );
                }
            }
        }
        Kind::Hello => {
            let _ = message.json::<Hello>();
        }
        Kind::HelloReply => {
            let _ = message.json::<HelloReply>();
        }
        Kind::RoundEnd => {
            let _ = message.json::<RoundEnd>();
        }
        Kind::Resumed => {
            let _ = message.json::<Resumed>();
        }
        Kind::ChannelHello => {
            let _ = message.json::<ChannelHello>();
        }
        Kind::State => read_state(message.payload.clone()),
        Kind::Complete
        | Kind::Abort
        | Kind::Ready
        | Kind::Go
        | Kind::ChannelsReady
        | Kind::ChannelEnd => {}
    }
}

/// A snapshot's `state.gws` (or a migration's `State` payload): the
/// container and every section the VMM reads from it.
fn read_state(bytes: Vec<u8>) {
    if let Ok(container) = Container::from_bytes(bytes, KNOWN_SECTIONS) {
        let _ = read_saved(&container, std::path::Path::new("<fuzz input>"));
    }
}

/// Section kinds a structured snapshot input can name: godwit's own, and
/// one optional and one required kind it does not know.
fn section_kind(index: u8) -> SectionKind {
    let unknown = |required| SectionKind {
        id: 0x7000 + u32::from(required),
        name: "unknown",
        version: 1,
        min_version: 1,
        required,
        instanced: true,
    };
    let n = KNOWN_SECTIONS.len() + 2;
    match usize::from(index) % n {
        i if i < KNOWN_SECTIONS.len() => KNOWN_SECTIONS[i],
        i if i == KNOWN_SECTIONS.len() => unknown(false),
        _ => unknown(true),
    }
}

/// A snapshot state file. The first byte picks the form of the rest: even,
/// the file's bytes; odd, a machine type (`len u8`, text) and a list of
/// sections (`kind u8, instance u8, json u8, len u16, payload`) that
/// godwit's own writer assembles, so that the fuzzer reaches each
/// section's decoder past the checksums.
pub fn snapshot_state(data: &[u8]) {
    let mut input = Input::new(data);
    if input.u8() & 1 == 0 {
        read_state(input.rest().to_vec());
        return;
    }
    let machine_len = usize::from(input.u8());
    let machine = String::from_utf8_lossy(input.bytes(machine_len)).into_owned();
    let Ok(mut writer) = ContainerWriter::new(&machine) else {
        return;
    };
    while !input.is_empty() {
        let kind = section_kind(input.u8());
        let instance = u32::from(input.u8());
        let encoding = if input.u8() & 1 == 0 {
            Encoding::Json
        } else {
            Encoding::Raw
        };
        let len = usize::from(input.u16());
        let payload = input.bytes(len).to_vec();
        let _ = writer.add_raw(&kind, instance, encoding, payload);
    }
    read_state(writer.to_bytes());
}

/// The header of a memory file: `file_len u64` (the file's length), then
/// the first bytes of the file (at most a page, as `read_info` reads).
pub fn memory_header(data: &[u8]) {
    let mut input = Input::new(data);
    let file_len = input.u64();
    let header = input.rest();
    let header = &header[..header.len().min(4096)];
    let _ = decode_header_bytes(header, file_len);
}
