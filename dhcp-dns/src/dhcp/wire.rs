//! Reading requests and writing replies.
//!
//! dhcproto decodes the fixed BOOTP header and encodes every option we send, but its option
//! decoder is not used on untrusted bytes: it stops silently at the first option it cannot
//! decode (losing the rest), does not check the magic cookie, does not follow option 52
//! overload, and some of its option decoders assert on lengths. So the options area is walked
//! here with explicit bounds checks, and only the handful of options the server acts on are
//! interpreted. A framing error drops the whole message: a client that cannot frame its options
//! cannot be trusted about their values.
//!
//! dhcproto also encodes options in code order, while RFC 2132 9.8 asks servers to follow the
//! parameter request list and clients expect option 53 first; so the reply is its header (from
//! dhcproto) followed by options appended in our order.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use dhcproto::v4::{self, DhcpOption, MessageType};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use super::DhcpDrop;

/// Offsets into the BOOTP header (RFC 2131 section 2, figure 1).
mod field {
    use std::ops::Range;
    pub const OP: usize = 0;
    pub const HTYPE: usize = 1;
    pub const HLEN: usize = 2;
    pub const SNAME: Range<usize> = 44..108;
    pub const FILE: Range<usize> = 108..236;
    pub const COOKIE: Range<usize> = 236..240;
    pub const OPTIONS: usize = 240;
}

/// BOOTP's minimum message size (RFC 951, RFC 1542 2.1): replies are padded to it.
pub(crate) const MIN_REPLY_LEN: usize = 300;

const OPT_PAD: u8 = 0;
const OPT_END: u8 = 255;
const OPT_HOSTNAME: u8 = 12;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_OVERLOAD: u8 = 52;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_PRL: u8 = 55;
const OPT_CLIENT_ID: u8 = 61;

/// What the server needs from a client message.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    /// The decoded fixed header (its options are not used).
    pub header: v4::Message,
    pub mac: [u8; 6],
    pub msg_type: MessageType,
    pub requested_ip: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
    pub client_id: Option<Vec<u8>>,
    pub hostname: Option<String>,
    pub prl: Option<Vec<u8>>,
}

/// Parses one DHCP message received by the server.
pub(crate) fn parse(payload: &[u8]) -> Result<Request, DhcpDrop> {
    if payload.len() < field::OPTIONS {
        return Err(DhcpDrop::Malformed);
    }
    if payload[field::OP] != 1 {
        return Err(DhcpDrop::NotBootRequest);
    }
    if payload[field::HTYPE] != 1 || payload[field::HLEN] != 6 {
        return Err(DhcpDrop::BadHardware);
    }
    if payload[field::COOKIE] != v4::MAGIC {
        return Err(DhcpDrop::Malformed);
    }

    // RFC 3396: an option may be split into several instances; their values concatenate.
    let mut opts: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
    scan_options(&payload[field::OPTIONS..], &mut opts)?;
    // RFC 2132 9.3: option 52 says the file and/or sname fields hold more options, read in that
    // order after the options field.
    if let Some(overload) = opts.remove(&OPT_OVERLOAD) {
        let [value] = overload[..] else {
            return Err(DhcpDrop::Malformed);
        };
        if !(1..=3).contains(&value) {
            return Err(DhcpDrop::Malformed);
        }
        if value & 1 != 0 {
            scan_options(&payload[field::FILE], &mut opts)?;
        }
        if value & 2 != 0 {
            scan_options(&payload[field::SNAME], &mut opts)?;
        }
        opts.remove(&OPT_OVERLOAD);
    }

    let msg_type = match opts.get(&OPT_MESSAGE_TYPE).map(Vec::as_slice) {
        None => return Err(DhcpDrop::NoMessageType),
        Some([t]) => MessageType::from(*t),
        Some(_) => return Err(DhcpDrop::Malformed),
    };
    let requested_ip = ipv4_option(&opts, OPT_REQUESTED_IP)?;
    let server_id = ipv4_option(&opts, OPT_SERVER_ID)?;
    let client_id = match opts.remove(&OPT_CLIENT_ID) {
        Some(id) if id.len() > 255 => return Err(DhcpDrop::Malformed),
        Some(id) if !id.is_empty() => Some(id),
        _ => None,
    };
    let hostname = opts
        .get(&OPT_HOSTNAME)
        .and_then(|raw| super::sanitize_hostname(raw));
    let prl = opts.remove(&OPT_PRL);

    // The header alone, with an empty options field, so dhcproto's option decoder never sees
    // the client's bytes.
    let mut header = [0u8; field::OPTIONS + 1];
    header[..field::OPTIONS].copy_from_slice(&payload[..field::OPTIONS]);
    header[field::OPTIONS] = OPT_END;
    let header =
        v4::Message::decode(&mut Decoder::new(&header)).map_err(|_| DhcpDrop::Malformed)?;
    let mac = header
        .chaddr()
        .try_into()
        .map_err(|_| DhcpDrop::BadHardware)?;

    Ok(Request {
        header,
        mac,
        msg_type,
        requested_ip,
        server_id,
        client_id,
        hostname,
        prl,
    })
}

fn ipv4_option(opts: &BTreeMap<u8, Vec<u8>>, code: u8) -> Result<Option<Ipv4Addr>, DhcpDrop> {
    match opts.get(&code).map(Vec::as_slice) {
        None => Ok(None),
        Some(&[a, b, c, d]) => Ok(Some(Ipv4Addr::new(a, b, c, d))),
        Some(_) => Err(DhcpDrop::Malformed),
    }
}

/// Walks one options area (RFC 2132 section 2): pads are skipped, End stops the walk, every
/// other option must fit in the area. An area that ends without End is accepted as long as no
/// option was cut.
fn scan_options(mut area: &[u8], opts: &mut BTreeMap<u8, Vec<u8>>) -> Result<(), DhcpDrop> {
    loop {
        match area {
            [] | [OPT_END, ..] => return Ok(()),
            [OPT_PAD, rest @ ..] => area = rest,
            [code, len, rest @ ..] => {
                let len = usize::from(*len);
                let (value, rest) = rest.split_at_checked(len).ok_or(DhcpDrop::Malformed)?;
                opts.entry(*code).or_default().extend_from_slice(value);
                area = rest;
            }
            [_] => return Err(DhcpDrop::Malformed),
        }
    }
}

/// Everything that goes into a reply besides its options.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplyHeader {
    pub xid: u32,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 6],
}

/// Encodes a BOOTREPLY with `options` in the given order (the caller puts option 53 first),
/// then End, padded to the BOOTP minimum of 300 bytes.
pub(crate) fn encode_reply(h: &ReplyHeader, options: &[DhcpOption]) -> Result<Vec<u8>, DhcpDrop> {
    let mut msg = v4::Message::new_with_id(
        h.xid,
        h.ciaddr,
        h.yiaddr,
        Ipv4Addr::UNSPECIFIED,
        h.giaddr,
        &h.chaddr,
    );
    msg.set_opcode(v4::Opcode::BootReply)
        .set_htype(v4::HType::Eth)
        .set_flags(v4::Flags::new(h.flags));
    let mut buf = Vec::with_capacity(576);
    let mut enc = Encoder::new(&mut buf);
    // With no options in `msg`, dhcproto writes the header and the magic cookie only.
    msg.encode(&mut enc).map_err(|_| DhcpDrop::Encode)?;
    for opt in options {
        opt.encode(&mut enc).map_err(|_| DhcpDrop::Encode)?;
    }
    enc.write_u8(OPT_END).map_err(|_| DhcpDrop::Encode)?;
    if buf.len() < MIN_REPLY_LEN {
        buf.resize(MIN_REPLY_LEN, OPT_PAD);
    }
    Ok(buf)
}

/// The option codes of an encoded message's options field, in wire order (for tests and
/// traces). Stops at End or at the first framing error.
#[cfg(test)]
pub(crate) fn option_codes(payload: &[u8]) -> Vec<u8> {
    let mut codes = Vec::new();
    let mut area = payload.get(field::OPTIONS..).unwrap_or_default();
    loop {
        match area {
            [] | [OPT_END, ..] | [_] => return codes,
            [OPT_PAD, rest @ ..] => area = rest,
            [code, len, rest @ ..] => {
                codes.push(*code);
                match rest.get(usize::from(*len)..) {
                    Some(rest) => area = rest,
                    None => return codes,
                }
            }
        }
    }
}
