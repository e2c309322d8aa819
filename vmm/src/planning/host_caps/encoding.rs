//! How a report spells its values: feature bits as hex and names, CPUID
//! entries as colon-separated hex, and the serde helpers that read and write
//! those spellings (and treat `null` like an absent member, as the schema
//! allows).

use serde::{Deserialize, Deserializer};

use godwit_devices::virtio::net::features::{self, Features};
use godwit_migration::cpu_compat::CpuidEntry;

/// `0x` and 16 hex digits: how a report writes a 64-bit feature set.
pub fn hex64(v: u64) -> String {
    format!("{v:#018x}")
}

/// Reads `0x` followed by 1 to 16 hex digits.
pub fn parse_hex(s: &str) -> Option<u64> {
    let digits = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// Canonical names of the bits in `bits` (`bitN` for bits the table lacks).
pub fn name_list(bits: Features) -> Vec<String> {
    features::bits(bits).map(features::name_of).collect()
}

/// A CPUID entry as a report writes it: `function:index:flags:eax:ebx:ecx:edx`,
/// each 8 hex digits (compact: a table has dozens of entries).
pub fn cpuid_entry_text(e: &CpuidEntry) -> String {
    format!(
        "{:08x}:{:08x}:{:08x}:{:08x}:{:08x}:{:08x}:{:08x}",
        e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx
    )
}

/// Reads [`cpuid_entry_text`].
pub fn parse_cpuid_entry(s: &str) -> Option<CpuidEntry> {
    let mut v = [0u32; 7];
    let mut parts = s.split(':');
    for slot in v.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 8 {
            return None;
        }
        *slot = u32::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(CpuidEntry {
        function: v[0],
        index: v[1],
        flags: v[2],
        eax: v[3],
        ebx: v[4],
        ecx: v[5],
        edx: v[6],
    })
}

pub(crate) fn serialize_entries<S: serde::Serializer>(
    entries: &[CpuidEntry],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(entries.iter().map(cpuid_entry_text))
}

/// A member whose `null` means the same as its absence: the type's default.
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn not_hex<E: serde::de::Error>(s: &str) -> E {
    E::custom(format!(
        "'{s}' is not a hex number of up to 32 digits such as \"0x0000000000000001\""
    ))
}

fn check_hex<E: serde::de::Error>(s: String) -> Result<String, E> {
    match features::parse_hex(&s) {
        Some(_) => Ok(s),
        None => Err(not_hex(&s)),
    }
}

/// A feature set in hex (16 digits, or 32 with bits above 63), as its value.
pub(crate) fn hex_bits<'de, D: Deserializer<'de>>(d: D) -> Result<Features, D::Error> {
    let s = String::deserialize(d)?;
    features::parse_hex(&s).ok_or_else(|| not_hex(&s))
}

/// A hex number, kept as written.
pub(crate) fn hex_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    check_hex(String::deserialize(d)?)
}

/// An optional hex number, kept as written.
pub(crate) fn opt_hex_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)?.map(check_hex).transpose()
}

/// One CPUID entry in its text form; a wrapper so that each list element is
/// read on its own and an error names its index.
struct CpuidText(CpuidEntry);

impl<'de> Deserialize<'de> for CpuidText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_cpuid_entry(&s).map(CpuidText).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "'{s}' is not a CPUID entry function:index:flags:eax:ebx:ecx:edx (7 hex numbers of up to 8 digits)"
            ))
        })
    }
}

/// A CPUID table in text form (absent or `null`: empty).
pub(crate) fn cpuid_entries<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<CpuidEntry>, D::Error> {
    let list: Option<Vec<CpuidText>> = Option::deserialize(d)?;
    Ok(list.into_iter().flatten().map(|e| e.0).collect())
}
