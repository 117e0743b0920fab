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
    EVENT_FLOW_TABLE_FULL, EVENT_NO_REDIRECT_TARGET, FlowKey, FlowValue, MAP_SETS, Verdict,
    stats_index,
};

use crate::{
    maps::{CONFIG, EVENTS, FLOWS, SETS, STATS},
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
    if verdict == Verdict::Divert && !record_flow(verdict, set, slot, pkt, uid) {
        event(EVENT_FLOW_TABLE_FULL);
        return TC_ACT_SHOT as i32;
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

/// Records the packet's flow; false if it is a new flow and the table is full (refused).
#[inline(always)]
fn record_flow(verdict: Verdict, set: u32, slot: u32, pkt: &Packet, uid: u32) -> bool {
    if pkt.family == 0 {
        // No tuple to record: the agent finds no flow for it and drops it.
        return true;
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
    if !opens && let Some(entry) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: a valid map value; concurrent writers only race on whole u32/u64 fields.
        let entry = unsafe { &mut *entry };
        entry.uid = uid;
        entry.rule = slot;
        entry.verdict = verdict as u8;
        entry.set = set as u8;
        entry.last_seen_ns = now;
        return true;
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
    FLOWS.insert(&key, &value, 0).is_ok()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
