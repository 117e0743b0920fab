//! Hoshino's TC classifier: picks the first policy rule that matches a packet and passes, drops or
//! redirects it (to the tunnel TUN or the divert TUN). The map layout is in `hoshino-common`.
#![no_std]
#![no_main]

mod maps;
mod parse;
mod select;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_ns, generated::bpf_redirect},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use hoshino_common::{
    CONFIG_ENABLED, CONFIG_L3_INTERFACE, CONFIG_LOG_VERDICTS, Config, DEFAULT_SLOT,
    EVENT_FLOW_TABLE_FULL, EVENT_NO_REDIRECT_TARGET, EVENT_UID_FLOW_CAP, FlowKey, FlowValue,
    MAP_SETS, Verdict, stats_index,
};

use crate::{
    maps::{CONFIG, EVENTS, FLOWS, SETS, STATS, UID_FLOWS},
    parse::{Packet, parse},
    select::select_rule,
};

#[classifier]
pub fn hoshino(ctx: TcContext) -> i32 {
    let Some(config) = CONFIG.get(0) else {
        return TC_ACT_OK as i32;
    };
    if config.flags & CONFIG_ENABLED == 0 {
        return TC_ACT_OK as i32;
    }
    // SAFETY: the context pointer is valid for the program's run; `mark` is readable in TC.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if config.reinject_mark != 0 && mark == config.reinject_mark {
        return TC_ACT_OK as i32;
    }
    let set = config.active_set % MAP_SETS;
    let Some(meta) = SETS.get(set) else {
        return TC_ACT_OK as i32;
    };
    let pkt = parse(&ctx, config.flags & CONFIG_L3_INTERFACE != 0);
    let uid = ctx.get_socket_uid();
    let (slot, verdict) = match select_rule(set, meta, &pkt, uid) {
        Some((rule, verdict)) => (rule, verdict),
        None => (DEFAULT_SLOT, meta.default_verdict),
    };
    let verdict = Verdict::from_raw(verdict).unwrap_or(Verdict::Pass);
    let packets = count(set, slot, ctx.len());
    if config.flags & CONFIG_LOG_VERDICTS != 0 && packets.is_power_of_two() {
        debug!(
            &ctx,
            "rule {} verdict {} family {} proto {} dport {} uid {} (packet {} on this cpu)",
            slot,
            verdict as u8,
            pkt.family,
            pkt.proto,
            pkt.dst_port,
            uid,
            packets
        );
    }
    apply(config, verdict, set, slot, &pkt, uid)
}

/// Adds the packet to `slot`'s counters and returns the slot's packet count on this CPU.
#[inline(always)]
fn count(set: u32, slot: u32, len: u32) -> u64 {
    match STATS.get_ptr_mut(stats_index(set, slot)) {
        Some(stats) => {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            let stats = unsafe { &mut *stats };
            stats.packets += 1;
            stats.bytes += u64::from(len);
            stats.packets
        }
        None => 0,
    }
}

#[inline(always)]
fn apply(config: &Config, verdict: Verdict, set: u32, slot: u32, pkt: &Packet, uid: u32) -> i32 {
    let ifindex = match verdict {
        Verdict::Pass => return TC_ACT_OK as i32,
        Verdict::Drop => return TC_ACT_SHOT as i32,
        Verdict::Tunnel => config.tunnel_ifindex,
        Verdict::Divert => config.divert_ifindex,
    };
    if ifindex == 0 {
        event(EVENT_NO_REDIRECT_TARGET);
        return TC_ACT_SHOT as i32;
    }
    // Only diverted flows are recorded: the agent decides them per uid; tunnel traffic needs no
    // entry and must not take the room of those that do.
    if verdict == Verdict::Divert {
        match record_flow(config, verdict, set, slot, pkt, uid) {
            Recorded::Yes => {}
            Recorded::TableFull => {
                event(EVENT_FLOW_TABLE_FULL);
                return TC_ACT_SHOT as i32;
            }
            Recorded::UidAtCap => {
                event(EVENT_UID_FLOW_CAP);
                return TC_ACT_SHOT as i32;
            }
        }
    }
    // SAFETY: plain helper call; it only records the target for after the program returns.
    // While the agent is down its TUN is gone and the kernel drops what is redirected there.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

#[inline(always)]
fn event(slot: u32) {
    if let Some(count) = EVENTS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *count += 1 };
    }
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Whether a divert packet's flow is recorded (else the flow is refused).
enum Recorded {
    Yes,
    TableFull,
    UidAtCap,
}

/// Records the packet's flow; a new flow is refused when the table is full or its uid is at
/// the per-uid cap.
#[inline(always)]
fn record_flow(
    config: &Config,
    verdict: Verdict,
    set: u32,
    slot: u32,
    pkt: &Packet,
    uid: u32,
) -> Recorded {
    if pkt.family == 0 {
        // No tuple to record: the agent finds no flow for it and drops it.
        return Recorded::Yes;
    }
    let key = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        src_port: pkt.src_port,
        dst_port: pkt.dst_port,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let opens = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let previous_uid = match FLOWS.get_ptr_mut(&key) {
        Some(entry) => {
            // SAFETY: a valid map value; concurrent writers only race on whole u32/u64 fields.
            let entry = unsafe { &mut *entry };
            if !opens {
                entry.uid = uid;
                entry.rule = slot;
                entry.verdict = verdict as u8;
                entry.set = set as u8;
                entry.last_seen_ns = now;
                return Recorded::Yes;
            }
            Some(entry.uid)
        }
        None => None,
    };
    // A new flow for this uid: a new tuple, or a SYN moving a recorded tuple to another uid.
    let new_for_uid = previous_uid != Some(uid);
    if new_for_uid && config.flows_per_uid != 0 {
        let count = UID_FLOWS.get_ptr(&uid).map_or(0, |c| {
            // SAFETY: a valid map value.
            unsafe { *c }
        });
        if count >= config.flows_per_uid {
            return Recorded::UidAtCap;
        }
    }
    let value = FlowValue {
        uid,
        rule: slot,
        verdict: verdict as u8,
        set: set as u8,
        _pad: [0; 6],
        last_seen_ns: now,
        started_ns: now,
    };
    // BPF_ANY: a SYN on a recorded tuple replaces the old flow; a new key in a full table fails
    // (E2BIG) and the flow is refused, so no live flow is ever evicted.
    if FLOWS.insert(&key, &value, 0).is_err() {
        return Recorded::TableFull;
    }
    if new_for_uid && config.flows_per_uid != 0 {
        count_uid_flow(uid);
    }
    Recorded::Yes
}

/// Counts one more flow for `uid` (the agent's sweep recomputes the counts from the table).
#[inline(always)]
fn count_uid_flow(uid: u32) {
    match UID_FLOWS.get_ptr_mut(&uid) {
        Some(count) => {
            // SAFETY: a valid map value; a lost increment under a race is corrected by the
            // sweep's recount.
            unsafe { *count += 1 };
        }
        None => {
            // BPF_NOEXIST: another CPU may have created it meanwhile; then this count is lost
            // until the next recount, which errs towards admitting.
            let _ = UID_FLOWS.insert(&uid, &1, 1);
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
