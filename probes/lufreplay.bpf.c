// SPDX-License-Identifier: GPL-2.0
/*
 * lufreplay recorder probes (bcc). One fixed 64-byte record per event goes into one BPF ring buffer;
 * userspace decodes whole spans with numpy. Only tracepoint arguments are read: bcc compiles against
 * headers that need not match the running kernel, so no kernel struct is ever dereferenced (except by the
 * exact tier at the end of this file, compiled in only where the headers match).
 *
 * Compiled-in flags (set by lufreplay/capture/probes.py):
 *   K_<KIND>          kind ids, from lufreplay.schema.RAW_KIND
 *   LR_NKINDS         size of the per-CPU loss array (max kind id + 1)
 *   LR_RB_PAGES       ring buffer size in pages
 *   LR_FLUSH_TLB_FUNC address of the kernel's TLB flush function (kallsyms)
 *   LR_FILTER         defined: per-target families only for tgids in `targets`
 *   LR_SELF_TGID      the recorder itself (never traced in per-target or file families)
 *   LR_RAW_IPI        defined: tlb/csd/ipi probes are raw tracepoints (per-program recursion guard)
 *   LR_RAW_PAGE       defined: page allocator probes are raw tracepoints; with
 *   LR_VMEMMAP_BASE, LR_STRUCT_PAGE_SIZE  page pointer -> pfn constants (calibrated at record start)
 *   LR_SWP_PFN_BITS, LR_MIG_READ  migration-entry decoding constants (host-probing §4.5)
 *   LR_WAKE_RECORDS   records one CPU may add since the consumer's last drain before it wakes the consumer
 *   LR_MASK_WORDS     u64 words of a cpumask on this host (nr_cpu_ids / 64, rounded up; 1 up to 64 CPUs)
 *   LR_NR_CPU_IDS     nr_cpu_ids of this host (CPU ids are below it)
 *   LR_EXACT          defined: the exact tier's kprobes (end of this file) are compiled in
 *   LR_SHOOT          defined: remote shootdowns from the flush function on the receiving CPU, for kernels
 *                     without csd:csd_queue_cpu (end of this file); LR_SHOOT_FENTRY: by fentry, else a kprobe
 *   LR_NO_<group>__<name>  defined: this kernel has no such tracepoint; its probe is left out (bcc
 *                     cannot compile a TRACEPOINT_PROBE without the tracepoint's format file)
 */
#include <uapi/linux/ptrace.h>
/* Only what the tracepoint formats need (enum migrate_mode): linux/sched.h and linux/mmzone.h, once included
 * here, doubled the compile time and changed no instruction of any program. */
#include <linux/migrate_mode.h>

struct lr_rec {
    u64 ts;
    u32 pid;
    u32 tgid;
    u16 cpu;
    u16 kind;
    u32 x;
    u64 a, b, c, d, e;
};

/* Sub-event ids (lufreplay.schema enums). */
#define RE_DIRECT_BEGIN 0
#define RE_DIRECT_END 1
#define RE_MEMCG_BEGIN 2
#define RE_MEMCG_END 3
#define RE_SOFT_BEGIN 4
#define RE_SOFT_END 5
#define RE_NODE_BEGIN 6
#define RE_NODE_END 7
#define RE_KSWAPD_WAKE 8
#define RE_KSWAPD_SLEEP 9
#define RE_SHRINK_INACTIVE 10
#define RE_RECLAIM_PAGES 11
#define RE_WRITE_FOLIO 12

#define CTX_DIRECT 1
#define CTX_MEMCG 2
#define CTX_NODE 3
#define CTX_KSWAPD 4
#define CTX_PROACTIVE 5
#define CTX_MIGRATION 6

#define ME_SET_PTE 0
#define ME_REMOVE_PTE 1
#define ME_SET_PMD 2
#define ME_REMOVE_PMD 3
#define ME_START 4
#define ME_END 5
#define ME_COMPACTION 6

#define PE_FREE 0
#define PE_ALLOC 1
#define PE_PCPU_DRAIN 2
#define PE_ZONE_LOCKED 3

#define SRC_PAGE_CACHE 1
#define SRC_MIGRATION 2
#define SRC_RECLAIM_OTHER 3

#define FE_WRITE_BEGIN 0
#define FE_TRUNCATE 1
#define FE_DIRTY_FOLIO 2

#define PR_FORK 0
#define PR_EXEC 1
#define PR_EXIT 2

#define LR_CLONE_THREAD 0x00010000ULL

BPF_RINGBUF_OUTPUT(events, LR_RB_PAGES);
BPF_PERCPU_ARRAY(lost, u64, LR_NKINDS);      /* ring reserve failures per kind */
BPF_ARRAY(ctl, u64, 1);                      /* 0: not started, 1: recording, 2: stopped */
BPF_PERCPU_ARRAY(totals, u64, 2);            /* 0: pages allocated, 1: pages freed (2^order summed) */
/* Records this CPU added since userspace last drained the ring (userspace zeroes it after each drain). */
BPF_PERCPU_ARRAY(since_drain, u64, 1);
/* The recorder's own time on each CPU, from sched_switch: what its wake-ups cost the workload's CPUs. */
struct self_run_t {
    u64 last_switch;  /* ts of this CPU's previous context switch */
    u64 ns;           /* time the recorder's threads ran here */
    u64 slices;       /* times one of its threads was switched out here */
    u64 shootdowns;   /* remote shootdowns the recorder itself sent from here (its own frees) */
};
BPF_PERCPU_ARRAY(self_run, struct self_run_t, 1);
BPF_HASH(targets, u32, u8, 65536);           /* traced tgids */
struct task_ctx_t {
    u8 ctx;
    u8 saved;
};
BPF_HASH(task_ctx, u32, struct task_ctx_t, 65536); /* tid -> UNMAP_CTX while in reclaim/migration */
BPF_TABLE("lru_hash", u64, s64, rss_prev, 65536);  /* (mm_id << 8 | member) -> last size */
BPF_TABLE("lru_hash", u64, u8, mm_seen, 65536);    /* (mm_id << 32 | tgid) already emitted */
BPF_TABLE("lru_hash", u64, u8, victims, 65536);    /* head pfns removed from the page cache by reclaim */
BPF_TABLE("lru_hash", u64, u8, migsrc, 65536);     /* head pfns that were migration sources */
struct bits_t {
    u64 w[8];
};
BPF_HASH(pending, u64, struct bits_t, 65536);      /* pfn >> 9 -> bitmap of its 512 pfns */
struct sc_t {
    u64 ts;
    u64 a0, a1, a2, a3;
    u32 nr;
};
BPF_HASH(sc_enter, u32, struct sc_t, 16384);       /* tid -> pending syscall entry */

static __always_inline int recording(void)
{
    int k = 0;
    u64 *v = ctl.lookup(&k);
    return v && *v == 1;
}

static __always_inline int traced(void)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid == LR_SELF_TGID)
        return 0;
#ifdef LR_FILTER
    return targets.lookup(&tgid) != 0;
#else
    return 1;
#endif
}

static __always_inline int not_self(void)
{
    return (bpf_get_current_pid_tgid() >> 32) != LR_SELF_TGID;
}

static __always_inline void count_self_shootdown(void)
{
    int z = 0;
    struct self_run_t *sr = self_run.lookup(&z);
    if (sr && !not_self())
        sr->shootdowns++;
}

/* One record of task ``pt`` (pid_tgid) on CPU ``cpu`` at ``ts``: another CPU's event when a probe emits on its
 * behalf (the receiving side of a shootdown, where the kernel has no csd:csd_queue_cpu). */
static __always_inline void emit_as(struct lr_rec *r, u16 kind, u64 ts, u64 pt, u32 cpu)
{
    r->ts = ts;
    r->pid = (u32)pt;
    r->tgid = pt >> 32;
    r->cpu = cpu;
    r->kind = kind;
    /* The consumer polls on a timer and is never woken per record: a woken recorder would pull an idle
     * CPU out of lazy-TLB mode and make it receive the very shootdowns being counted. Only a CPU whose
     * share of the ring passes the watermark wakes it, once per drain. */
    u64 flags = BPF_RB_NO_WAKEUP;
    int z = 0;
    u64 *sd = since_drain.lookup(&z);
    if (sd && ++(*sd) == LR_WAKE_RECORDS)
        flags = BPF_RB_FORCE_WAKEUP;
    if (events.ringbuf_output(r, sizeof(*r), flags) < 0) {
        u32 k = kind;
        u64 *v = lost.lookup(&k);
        if (v)
            (*v)++;
    }
}

static __always_inline void emit_at(struct lr_rec *r, u16 kind, u64 ts)
{
    emit_as(r, kind, ts, bpf_get_current_pid_tgid(), bpf_get_smp_processor_id());
}

static __always_inline void emit(struct lr_rec *r, u16 kind)
{
    emit_at(r, kind, bpf_ktime_get_ns());
}

static __always_inline void total_add(int idx, u32 order)
{
    u64 *v = totals.lookup(&idx);
    if (v)
        *v += 1ULL << (order & 31);
}

static __always_inline u8 cur_ctx(void)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct task_ctx_t *c = task_ctx.lookup(&tid);
    return c ? c->ctx : 0;
}

static __always_inline void ctx_begin(u8 ctx)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct task_ctx_t n = {};
    struct task_ctx_t *c = task_ctx.lookup(&tid);
    n.ctx = ctx;
    n.saved = c ? c->ctx : 0;
    task_ctx.update(&tid, &n);
}

static __always_inline void ctx_end(void)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct task_ctx_t *c = task_ctx.lookup(&tid);
    if (!c)
        return;
    if (c->saved) {
        struct task_ctx_t n = {};
        n.ctx = c->saved;
        task_ctx.update(&tid, &n);
    } else {
        task_ctx.delete(&tid);
    }
}

/* ---------------------------------------------------------------- TLB flushes, shootdowns, IPIs */

/* Receiving-side reasons run in the flush IPI and are not recorded: they undercount by design (untraced
 * early returns) and csd_queue_cpu is the authoritative remote count. A run of the tlb_flush program
 * that the kernel skips for recursion is always such a nested, IRQ-context (receiving-side) event. */
#define TLB_REASON_REMOTE_SHOOTDOWN 1
#define TLB_REASON_REMOTE_WRONG_CPU 5
#define TLB_REASON_REMOTE_SEND_IPI 4

#ifdef LR_SHOOT
/* Where the kernel has no csd:csd_queue_cpu (before 6.7: 6.1 LTS), remote shootdowns are counted where the
 * kernel counts them (irq_tlb_count, the TLB row of /proc/interrupts): in the flush function on the receiving
 * CPU, for each call another CPU initiated (fentry or kprobe at the end of this file). The sender is the task whose
 * TLB_REMOTE_SEND_IPI tlb_flush row its CPU emitted last: native_flush_tlb_multi traces that row, then queues
 * the calls and waits for every one of them, so no other flush of that CPU comes between. */
struct sender_t {
    u64 ts; /* the send row's timestamp */
    u64 pt; /* the sender's pid_tgid */
};
BPF_ARRAY(shoot_from, struct sender_t, LR_MASK_WORDS * 64);
BPF_ARRAY(self_sent, u64, LR_MASK_WORDS * 64); /* per sending CPU: the recorder's own remote shootdowns */

static __always_inline void note_sender(u32 reason, u64 ts)
{
    if (reason != TLB_REASON_REMOTE_SEND_IPI)
        return;
    u32 cpu = bpf_get_smp_processor_id();
    struct sender_t s = {};
    s.ts = ts;
    s.pt = bpf_get_current_pid_tgid();
    shoot_from.update(&cpu, &s);
}
#else
#define note_sender(reason, ts)
#endif

#ifndef LR_MASK_WORDS
#define LR_MASK_WORDS 1
#endif
#define LR_MASK_GROUPS ((LR_MASK_WORDS - 1 + 4) / 5)

/* A cpumask of more than 64 CPUs: words 1.. go into K_IPI_MASK_WORDS records (5 words each, x = index of the
 * first; all-zero groups left out), emitted before the head record with the head's timestamp, so that the
 * decoder joins them to it by (cpu, ts) and a ring drain that holds the head holds them too. Returns the
 * number of CPUs set in those words. */
static __always_inline u32 ipi_mask_rest(const u8 *mask, u32 nbytes, u64 ts)
{
    u32 n = 0;
#if LR_MASK_WORDS > 1
#pragma unroll
    for (u32 g = 0; g < LR_MASK_GROUPS; g++) {
        struct lr_rec c = {};
        u64 w[5] = {};
        u32 w0 = 1 + g * 5;
#pragma unroll
        for (u32 k = 0; k < 5; k++)
            if ((w0 + k) * 8 < nbytes)
                bpf_probe_read_kernel(&w[k], 8, mask + (w0 + k) * 8);
        if (!(w[0] | w[1] | w[2] | w[3] | w[4]))
            continue;
        c.x = w0;
        c.a = w[0];
        c.b = w[1];
        c.c = w[2];
        c.d = w[3];
        c.e = w[4];
        n += __builtin_popcountll(w[0]) + __builtin_popcountll(w[1]) + __builtin_popcountll(w[2]) +
             __builtin_popcountll(w[3]) + __builtin_popcountll(w[4]);
        emit_at(&c, K_IPI_MASK_WORDS, ts);
    }
#endif
    return n;
}

#ifdef LR_RAW_IPI
#ifndef LR_NO_tlb__tlb_flush
RAW_TRACEPOINT_PROBE(tlb_flush)
{
    if (!recording())
        return 0;
    u32 reason = (u32)ctx->args[0];
    if (reason == TLB_REASON_REMOTE_SHOOTDOWN || reason == TLB_REASON_REMOTE_WRONG_CPU)
        return 0;
    struct lr_rec r = {};
    u64 ts = bpf_ktime_get_ns();
    r.a = reason;
    r.b = ctx->args[1];
    emit_at(&r, K_TLB_FLUSH, ts);
    note_sender(reason, ts);
    return 0;
}
#endif

#ifndef LR_NO_csd__csd_queue_cpu
RAW_TRACEPOINT_PROBE(csd_queue_cpu)
{
    if (!recording() || ctx->args[2] != LR_FLUSH_TLB_FUNC)
        return 0;
    struct lr_rec r = {};
    r.a = (u32)ctx->args[0];
    r.b = ctx->args[1];
    count_self_shootdown();
    emit(&r, K_CSD_QUEUE_CPU);
    return 0;
}
#endif

#ifndef LR_NO_ipi__ipi_send_cpu
RAW_TRACEPOINT_PROBE(ipi_send_cpu)
{
    if (!recording())
        return 0;
    struct lr_rec r = {};
    r.a = (u32)ctx->args[0]; /* the target CPU id */
    r.x = 1;
    r.b = ctx->args[2];
    r.c = ctx->args[1];
    emit(&r, K_IPI_SEND_CPU);
    return 0;
}
#endif

#ifndef LR_NO_ipi__ipi_send_cpumask
RAW_TRACEPOINT_PROBE(ipi_send_cpumask)
{
    if (!recording())
        return 0;
    struct lr_rec r = {};
    u64 mask = 0;
    u64 ts = bpf_ktime_get_ns();
    bpf_probe_read_kernel(&mask, sizeof(mask), (void *)ctx->args[0]);
    r.x = __builtin_popcountll(mask) + ipi_mask_rest((const u8 *)ctx->args[0], LR_MASK_WORDS * 8, ts);
    r.a = mask;
    r.b = ctx->args[2];
    r.c = ctx->args[1];
    emit_at(&r, K_IPI_SEND_CPUMASK, ts);
    return 0;
}
#endif
#else
#ifndef LR_NO_tlb__tlb_flush
TRACEPOINT_PROBE(tlb, tlb_flush)
{
    if (!recording())
        return 0;
    u32 reason = (u32)args->reason;
    if (reason == TLB_REASON_REMOTE_SHOOTDOWN || reason == TLB_REASON_REMOTE_WRONG_CPU)
        return 0;
    struct lr_rec r = {};
    u64 ts = bpf_ktime_get_ns();
    r.a = reason;
    r.b = args->pages;
    emit_at(&r, K_TLB_FLUSH, ts);
    note_sender(reason, ts);
    return 0;
}
#endif

#ifndef LR_NO_csd__csd_queue_cpu
TRACEPOINT_PROBE(csd, csd_queue_cpu)
{
    if (!recording() || (u64)args->func != LR_FLUSH_TLB_FUNC)
        return 0;
    struct lr_rec r = {};
    r.a = args->cpu;
    r.b = (u64)args->callsite;
    count_self_shootdown();
    emit(&r, K_CSD_QUEUE_CPU);
    return 0;
}
#endif

#ifndef LR_NO_ipi__ipi_send_cpu
TRACEPOINT_PROBE(ipi, ipi_send_cpu)
{
    if (!recording())
        return 0;
    struct lr_rec r = {};
    r.a = args->cpu; /* the target CPU id */
    r.x = 1;
    r.b = (u64)args->callback;
    r.c = (u64)args->callsite;
    emit(&r, K_IPI_SEND_CPU);
    return 0;
}
#endif

#ifndef LR_NO_ipi__ipi_send_cpumask
TRACEPOINT_PROBE(ipi, ipi_send_cpumask)
{
    if (!recording())
        return 0;
    struct lr_rec r = {};
    u32 dl = 0;
    u64 mask = 0;
    u64 ts = bpf_ktime_get_ns();
    bpf_probe_read_kernel(&dl, sizeof(dl), (void *)args + 8);
    bpf_probe_read_kernel(&mask, sizeof(mask), (void *)args + (dl & 0xffff));
    /* __data_loc: low 16 bits offset, high 16 bits length in bytes of the bitmask */
    u32 nbytes = dl >> 16 < LR_MASK_WORDS * 8 ? dl >> 16 : LR_MASK_WORDS * 8;
    r.x = __builtin_popcountll(mask) + ipi_mask_rest((const u8 *)args + (dl & 0xffff), nbytes, ts);
    r.a = mask;
    r.b = (u64)args->callback;
    r.c = (u64)args->callsite;
    emit_at(&r, K_IPI_SEND_CPUMASK, ts);
    return 0;
}
#endif
#endif

/* ---------------------------------------------------------------- reclaim context */

/* x = event | flags << 8 | (nid + 1) << 16 (0: no nid). Layout of a..e depends on the event (decode.py). */
static __always_inline void reclaim_rec(u32 event, u32 flags, int nid, u64 a, u64 b, u64 c, u64 d, u64 e)
{
    struct lr_rec r = {};
    r.x = event | ((flags & 0xff) << 8) | (((u32)(nid + 1) & 0xffff) << 16);
    r.a = a;
    r.b = b;
    r.c = c;
    r.d = d;
    r.e = e;
    emit(&r, K_RECLAIM);
}

#ifndef LR_NO_vmscan__mm_vmscan_direct_reclaim_begin
TRACEPOINT_PROBE(vmscan, mm_vmscan_direct_reclaim_begin)
{
    if (!recording())
        return 0;
    ctx_begin(CTX_DIRECT);
    reclaim_rec(RE_DIRECT_BEGIN, 0, -1, args->order, args->gfp_flags, 0, 0, 0);
    return 0;
}
#endif

#ifndef LR_NO_vmscan__mm_vmscan_direct_reclaim_end
TRACEPOINT_PROBE(vmscan, mm_vmscan_direct_reclaim_end)
{
    if (!recording())
        return 0;
    ctx_end();
    reclaim_rec(RE_DIRECT_END, 0, -1, 0, 0, 0, args->nr_reclaimed, 0);
    return 0;
}
#endif

#ifndef LR_NO_vmscan__mm_vmscan_memcg_reclaim_begin
TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_begin)
{
    if (!recording())
        return 0;
    ctx_begin(CTX_MEMCG);
    reclaim_rec(RE_MEMCG_BEGIN, 0, -1, args->order, args->gfp_flags, 0, 0, 0);
    return 0;
}
#endif

#ifndef LR_NO_vmscan__mm_vmscan_memcg_reclaim_end
TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_end)
{
    if (!recording())
        return 0;
    ctx_end();
    reclaim_rec(RE_MEMCG_END, 0, -1, 0, 0, 0, args->nr_reclaimed, 0);
    return 0;
}
#endif

#ifndef LR_NO_vmscan__mm_vmscan_memcg_softlimit_reclaim_begin
TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_softlimit_reclaim_begin)
{
    if (!recording())
        return 0;
    ctx_begin(CTX_MEMCG);
    reclaim_rec(RE_SOFT_BEGIN, 0, -1, args->order, args->gfp_flags, 0, 0, 0);
    return 0;
}
#endif

#ifndef LR_NO_vmscan__mm_vmscan_memcg_softlimit_reclaim_end
TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_softlimit_reclaim_end)
{
    if (!recording())
        return 0;
    ctx_end();
    reclaim_rec(RE_SOFT_END, 0, -1, 0, 0, 0, args->nr_reclaimed, 0);
    return 0;
}
#endif

#ifndef LR_NO_vmscan__mm_vmscan_node_reclaim_begin
TRACEPOINT_PROBE(vmscan, mm_vmscan_node_reclaim_begin)
{
    if (!recording())
        return 0;
    ctx_begin(CTX_NODE);
    reclaim_rec(RE_NODE_BEGIN, 0, args->nid, args->order, args->gfp_flags, 0, 0, 0);
    return 0;
}
#endif

#ifndef LR_NO_vmscan__mm_vmscan_node_reclaim_end
TRACEPOINT_PROBE(vmscan, mm_vmscan_node_reclaim_end)
{
    if (!recording())
        return 0;
    ctx_end();
    reclaim_rec(RE_NODE_END, 0, -1, 0, 0, 0, args->nr_reclaimed, 0);
    return 0;
}
#endif

#ifndef LR_NO_vmscan__mm_vmscan_kswapd_wake
TRACEPOINT_PROBE(vmscan, mm_vmscan_kswapd_wake)
{
    if (!recording())
        return 0;
    reclaim_rec(RE_KSWAPD_WAKE, 0, args->nid, args->order, 0, 0, 0, 0);
    return 0;
}
#endif

#ifndef LR_NO_vmscan__mm_vmscan_kswapd_sleep
TRACEPOINT_PROBE(vmscan, mm_vmscan_kswapd_sleep)
{
    if (!recording())
        return 0;
    reclaim_rec(RE_KSWAPD_SLEEP, 0, args->nid, 0, 0, 0, 0, 0);
    return 0;
}
#endif

#ifndef LR_NO_vmscan__mm_vmscan_lru_shrink_inactive
TRACEPOINT_PROBE(vmscan, mm_vmscan_lru_shrink_inactive)
{
    if (!recording())
        return 0;
    reclaim_rec(RE_SHRINK_INACTIVE, args->reclaim_flags, args->nid, args->nr_unmap_fail, args->nr_ref_keep,
                args->nr_scanned, args->nr_reclaimed, args->nr_dirty);
    return 0;
}
#endif

#ifndef LR_NO_vmscan__mm_vmscan_reclaim_pages
TRACEPOINT_PROBE(vmscan, mm_vmscan_reclaim_pages)
{
    if (!recording())
        return 0;
    reclaim_rec(RE_RECLAIM_PAGES, 0, args->nid, args->nr_unmap_fail, args->nr_ref_keep, args->nr_scanned,
                args->nr_reclaimed, args->nr_dirty);
    return 0;
}
#endif

#ifndef LR_NO_vmscan__mm_vmscan_write_folio
TRACEPOINT_PROBE(vmscan, mm_vmscan_write_folio)
{
    if (!recording())
        return 0;
    reclaim_rec(RE_WRITE_FOLIO, args->reclaim_flags, -1, args->pfn, 0, 0, 0, 0);
    return 0;
}
#endif

/* ---------------------------------------------------------------- unmapped mms, mm ids, page cache */

#ifndef LR_NO_kmem__rss_stat
TRACEPOINT_PROBE(kmem, rss_stat)
{
    if (!recording())
        return 0;
    u32 mm_id = args->mm_id;
    u32 member = args->member;
    s64 size = args->size;
    u64 key = ((u64)mm_id << 8) | (member & 0xff);
    s64 *prev = rss_prev.lookup(&key);
    s64 delta = prev ? size - *prev : 0;
    /* In place when the key exists: an LRU-hash update allocates and swaps a node under a lock, and this
     * runs on every RSS change of every process (the costliest program in bench/record_overhead). */
    if (prev)
        *prev = size;
    else
        rss_prev.update(&key, &size);
    if (args->curr) {
        u64 mk = ((u64)mm_id << 32) | (bpf_get_current_pid_tgid() >> 32);
        if (!mm_seen.lookup(&mk)) {
            u8 one = 1;
            mm_seen.update(&mk, &one);
            struct lr_rec m = {};
            m.a = mm_id;
            emit(&m, K_MM);
        }
    }
    u8 c = cur_ctx();
    if (c) {
        struct lr_rec r = {};
        r.x = c;
        r.a = mm_id;
        r.b = member;
        r.c = (u64)delta;
        emit(&r, K_RSS_STAT);
    }
    return 0;
}
#endif

#ifndef LR_NO_filemap__mm_filemap_delete_from_page_cache
TRACEPOINT_PROBE(filemap, mm_filemap_delete_from_page_cache)
{
    if (!recording())
        return 0;
    u8 c = cur_ctx();
    u64 pfn = args->pfn;
    if (c && c != CTX_MIGRATION) {
        u8 one = 1;
        victims.update(&pfn, &one);
    }
    struct lr_rec r = {};
    r.x = (u32)args->order | ((u32)c << 8);
    r.a = pfn;
    r.b = args->i_ino;
    r.c = args->index;
    r.d = args->s_dev;
    emit(&r, K_FILEMAP_DELETE);
    return 0;
}
#endif

/* ---------------------------------------------------------------- migration */

static __always_inline void mark_migsrc(u64 entry, u32 order)
{
    u32 type = entry >> 59;
    if (type < LR_MIG_READ || type > LR_MIG_READ + 2)
        return;
    u64 off = (~entry << 5) >> 14;
    u64 pfn = off & ((1ULL << LR_SWP_PFN_BITS) - 1);
    if (order < 31)
        pfn &= ~((1ULL << order) - 1);
    u8 one = 1;
    migsrc.update(&pfn, &one);
}

static __always_inline void mig_rec(u32 event, u64 a, u64 b, u64 c, u64 d)
{
    struct lr_rec r = {};
    r.x = event;
    r.a = a;
    r.b = b;
    r.c = c;
    r.d = d;
    emit(&r, K_MIGRATE);
}

#ifndef LR_NO_migrate__set_migration_pte
TRACEPOINT_PROBE(migrate, set_migration_pte)
{
    if (!recording())
        return 0;
    mark_migsrc(args->pte, args->order);
    mig_rec(ME_SET_PTE, args->addr, args->pte, args->order, 0);
    return 0;
}
#endif

#ifndef LR_NO_migrate__remove_migration_pte
TRACEPOINT_PROBE(migrate, remove_migration_pte)
{
    if (!recording())
        return 0;
    mig_rec(ME_REMOVE_PTE, args->addr, args->pte, args->order, 0);
    return 0;
}
#endif

#ifndef LR_NO_thp__set_migration_pmd
TRACEPOINT_PROBE(thp, set_migration_pmd)
{
    if (!recording())
        return 0;
    mark_migsrc(args->pmd, 9);
    mig_rec(ME_SET_PMD, args->addr, args->pmd, 9, 0);
    return 0;
}
#endif

#ifndef LR_NO_thp__remove_migration_pmd
TRACEPOINT_PROBE(thp, remove_migration_pmd)
{
    if (!recording())
        return 0;
    mig_rec(ME_REMOVE_PMD, args->addr, args->pmd, 9, 0);
    return 0;
}
#endif

#ifndef LR_NO_migrate__mm_migrate_pages_start
TRACEPOINT_PROBE(migrate, mm_migrate_pages_start)
{
    if (!recording())
        return 0;
    ctx_begin(CTX_MIGRATION);
    mig_rec(ME_START, args->mode, args->reason, 0, 0);
    return 0;
}
#endif

#ifndef LR_NO_migrate__mm_migrate_pages
TRACEPOINT_PROBE(migrate, mm_migrate_pages)
{
    if (!recording())
        return 0;
    ctx_end();
    mig_rec(ME_END, args->succeeded, args->failed, args->mode, args->reason);
    return 0;
}
#endif

#ifndef LR_NO_compaction__mm_compaction_migratepages
TRACEPOINT_PROBE(compaction, mm_compaction_migratepages)
{
    if (!recording())
        return 0;
    mig_rec(ME_COMPACTION, args->nr_migrated, args->nr_failed, 0, 0);
    return 0;
}
#endif

/* ---------------------------------------------------------------- page allocator: free -> re-allocation */

/* One op on the 512-bit block `key` for bits [s, s + n): 0 set, 1 test, 2 test and clear.
 * Returns how many of those bits were set before. At most 8 word operations. */
static __always_inline u32 block_op(u64 key, u32 s, u32 n, int op)
{
    struct bits_t *b = pending.lookup(&key);
    if (!b) {
        if (op != 0)
            return 0;
        struct bits_t z = {};
        pending.update(&key, &z);
        b = pending.lookup(&key);
        if (!b)
            return 0;
    }
    u32 cnt = 0;
    u64 left = 0;
    u32 end = s + n;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        u32 lo = i * 64;
        u32 st = s > lo ? s : lo;
        u32 en = end < lo + 64 ? end : lo + 64;
        if (st < en) {
            u32 width = en - st;
            u64 m = width >= 64 ? ~0ULL : (((1ULL << width) - 1) << (st - lo));
            if (op == 0) {
                __sync_fetch_and_or(&b->w[i], m);
            } else {
                u64 w = b->w[i];
                cnt += __builtin_popcountll(w & m);
                if (op == 2 && (w & m))
                    __sync_fetch_and_and(&b->w[i], ~m);
            }
        }
        if (op == 2)
            left |= b->w[i];
    }
    if (op == 2 && cnt && !left)
        pending.delete(&key);
    return cnt;
}

/* A buddy block is aligned to its order, so an order <= 9 block lies in one key; order 10 spans two. */
static __always_inline u32 range_op(u64 pfn, u32 order, int op)
{
    if (order > 10)
        return 0;
    u32 n = 1U << order;
    u32 cnt = 0;
    if (n <= 512)
        return block_op(pfn >> 9, pfn & 511, n, op);
    cnt += block_op(pfn >> 9, 0, 512, op);
    cnt += block_op((pfn >> 9) + 1, 0, 512, op);
    return cnt;
}

static __always_inline void page_rec(u32 event, u32 source, u32 order, u64 pfn, u64 gfp, s64 mt, u64 refill, u32 cnt)
{
    struct lr_rec r = {};
    r.x = event | ((source & 0xff) << 8) | ((order & 0xff) << 16);
    r.a = pfn;
    r.b = gfp;
    r.c = (u64)mt;
    r.d = refill;
    r.e = cnt;
    emit(&r, K_PAGE);
}

static __always_inline void on_page_free(u64 pfn, u32 order)
{
    total_add(1, order);
    u32 src = 0;
    if (victims.lookup(&pfn)) {
        src = SRC_PAGE_CACHE;
        victims.delete(&pfn);
    } else if (migsrc.lookup(&pfn)) {
        src = SRC_MIGRATION;
        migsrc.delete(&pfn);
    } else {
        u8 c = cur_ctx();
        if (c && c != CTX_MIGRATION)
            src = SRC_RECLAIM_OTHER;
    }
    if (!src)
        return;
    range_op(pfn, order, 0);
    page_rec(PE_FREE, src, order, pfn, 0, -1, 0, order <= 10 ? (1U << order) : 0);
}

static __always_inline void on_page_alloc(u64 pfn, u32 order, u64 gfp, s64 mt)
{
    total_add(0, order);
    u32 cnt = range_op(pfn, order, 2);
    if (cnt)
        page_rec(PE_ALLOC, 0, order, pfn, gfp, mt, 0, cnt);
}

static __always_inline void on_page_pcpu_drain(u64 pfn, u32 order, s64 mt)
{
    u32 cnt = range_op(pfn, order, 1);
    if (cnt)
        page_rec(PE_PCPU_DRAIN, 0, order, pfn, 0, mt, 0, cnt);
}

static __always_inline void on_page_zone_locked(u64 pfn, u32 order, s64 mt, u64 refill)
{
    u32 cnt = range_op(pfn, order, 1);
    if (cnt)
        page_rec(PE_ZONE_LOCKED, 0, order, pfn, 0, mt, refill, cnt);
}

#ifdef LR_RAW_PAGE
/* Raw tracepoints: a per-program recursion guard instead of the per-CPU one all classic tracepoint
 * programs share, so a page freed in IRQ context is not lost because some other program was running.
 * They get `struct page *`; pfn = (page - vmemmap_base) / sizeof(struct page), both measured at record
 * start (lufreplay/capture/calibrate.py). Pointer arithmetic only: nothing is dereferenced.
 *
 * A raw program is still skipped when an IRQ-context event interrupts that same program. So each page
 * tracepoint gets a second program, attached after the first (it runs second on every hit): it does the
 * work only when the first one is mid-run on this CPU, i.e. when the kernel skipped the first for this
 * nested event. Losses are then the first program's recursion misses minus `rescued`. */
#define PAGE_PFN(p) (((u64)(p) - LR_VMEMMAP_BASE) / LR_STRUCT_PAGE_SIZE)
#define PG_FREE 0
#define PG_ALLOC 1
#define PG_PCPU_DRAIN 2
#define PG_ZONE_LOCKED 3

BPF_PERCPU_ARRAY(page_busy, u32, 4); /* the first program of page probe i is running on this CPU */
BPF_PERCPU_ARRAY(rescued, u64, 4);   /* nested events handled by the second program */

static __always_inline u32 *page_enter(int i)
{
    u32 *b = page_busy.lookup(&i);
    if (b)
        *b = 1;
    return b;
}

static __always_inline int page_nested(int i)
{
    u32 *b = page_busy.lookup(&i);
    if (!b || !*b)
        return 0;
    u64 *r = rescued.lookup(&i);
    if (r)
        (*r)++;
    return 1;
}

static __always_inline void raw_page_free(struct bpf_raw_tracepoint_args *ctx)
{
    u64 page = ctx->args[0];
    if (recording() && page)
        on_page_free(PAGE_PFN(page), (u32)ctx->args[1]);
}

static __always_inline void raw_page_alloc(struct bpf_raw_tracepoint_args *ctx)
{
    u64 page = ctx->args[0];
    if (recording() && page) /* NULL: failed allocation */
        on_page_alloc(PAGE_PFN(page), (u32)ctx->args[1], (u32)ctx->args[2], (s32)ctx->args[3]);
}

static __always_inline void raw_page_pcpu_drain(struct bpf_raw_tracepoint_args *ctx)
{
    u64 page = ctx->args[0];
    if (recording() && page)
        on_page_pcpu_drain(PAGE_PFN(page), (u32)ctx->args[1], (s32)ctx->args[2]);
}

static __always_inline void raw_page_zone_locked(struct bpf_raw_tracepoint_args *ctx)
{
    u64 page = ctx->args[0];
    if (recording() && page)
        on_page_zone_locked(PAGE_PFN(page), (u32)ctx->args[1], (s32)ctx->args[2], (s32)ctx->args[3]);
}

#ifndef LR_NO_kmem__mm_page_free
RAW_TRACEPOINT_PROBE(mm_page_free)
{
    u32 *b = page_enter(PG_FREE);
    raw_page_free(ctx);
    if (b)
        *b = 0;
    return 0;
}
#endif

#ifndef LR_NO_kmem__mm_page_alloc
RAW_TRACEPOINT_PROBE(mm_page_alloc)
{
    u32 *b = page_enter(PG_ALLOC);
    raw_page_alloc(ctx);
    if (b)
        *b = 0;
    return 0;
}
#endif

#ifndef LR_NO_kmem__mm_page_pcpu_drain
RAW_TRACEPOINT_PROBE(mm_page_pcpu_drain)
{
    u32 *b = page_enter(PG_PCPU_DRAIN);
    raw_page_pcpu_drain(ctx);
    if (b)
        *b = 0;
    return 0;
}
#endif

#ifndef LR_NO_kmem__mm_page_alloc_zone_locked
RAW_TRACEPOINT_PROBE(mm_page_alloc_zone_locked)
{
    u32 *b = page_enter(PG_ZONE_LOCKED);
    raw_page_zone_locked(ctx);
    if (b)
        *b = 0;
    return 0;
}
#endif

/* The second programs (attached by lufreplay/capture/probes.py after the ones above). */
#ifndef LR_NO_kmem__mm_page_free
int lr_nested_mm_page_free(struct bpf_raw_tracepoint_args *ctx)
{
    if (page_nested(PG_FREE))
        raw_page_free(ctx);
    return 0;
}
#endif

#ifndef LR_NO_kmem__mm_page_alloc
int lr_nested_mm_page_alloc(struct bpf_raw_tracepoint_args *ctx)
{
    if (page_nested(PG_ALLOC))
        raw_page_alloc(ctx);
    return 0;
}
#endif

#ifndef LR_NO_kmem__mm_page_pcpu_drain
int lr_nested_mm_page_pcpu_drain(struct bpf_raw_tracepoint_args *ctx)
{
    if (page_nested(PG_PCPU_DRAIN))
        raw_page_pcpu_drain(ctx);
    return 0;
}
#endif

#ifndef LR_NO_kmem__mm_page_alloc_zone_locked
int lr_nested_mm_page_alloc_zone_locked(struct bpf_raw_tracepoint_args *ctx)
{
    if (page_nested(PG_ZONE_LOCKED))
        raw_page_zone_locked(ctx);
    return 0;
}
#endif
#else
#ifndef LR_NO_kmem__mm_page_free
TRACEPOINT_PROBE(kmem, mm_page_free)
{
    if (!recording())
        return 0;
    on_page_free((u64)args->pfn, (u32)args->order);
    return 0;
}
#endif

#ifndef LR_NO_kmem__mm_page_alloc
TRACEPOINT_PROBE(kmem, mm_page_alloc)
{
    if (!recording() || args->pfn == (unsigned long)-1)
        return 0; /* failed allocation */
    on_page_alloc((u64)args->pfn, (u32)args->order, args->gfp_flags, args->migratetype);
    return 0;
}
#endif

#ifndef LR_NO_kmem__mm_page_pcpu_drain
TRACEPOINT_PROBE(kmem, mm_page_pcpu_drain)
{
    if (!recording())
        return 0;
    on_page_pcpu_drain((u64)args->pfn, (u32)args->order, args->migratetype);
    return 0;
}
#endif

#ifndef LR_NO_kmem__mm_page_alloc_zone_locked
TRACEPOINT_PROBE(kmem, mm_page_alloc_zone_locked)
{
    if (!recording())
        return 0;
    on_page_zone_locked((u64)args->pfn, (u32)args->order, args->migratetype, args->percpu_refill);
    return 0;
}
#endif
#endif

/* ---------------------------------------------------------------- per-target: faults and syscalls */

#ifndef LR_NO_exceptions__page_fault_user
TRACEPOINT_PROBE(exceptions, page_fault_user)
{
    if (!recording() || !traced())
        return 0;
    struct lr_rec r = {};
    r.a = args->address;
    r.b = args->error_code;
    emit(&r, K_FAULT);
    return 0;
}
#endif

static __always_inline void sc_begin(u32 nr, u64 a0, u64 a1, u64 a2, u64 a3)
{
    if (!recording() || !traced())
        return;
    u32 tid = bpf_get_current_pid_tgid();
    struct sc_t s = {};
    s.ts = bpf_ktime_get_ns();
    s.nr = nr;
    s.a0 = a0;
    s.a1 = a1;
    s.a2 = a2;
    s.a3 = a3;
    sc_enter.update(&tid, &s);
}

/* x = nr | (arg3 & 0xffffff) << 8; e = duration (40 bits) | (arg3 >> 24) << 40. */
static __always_inline void sc_finish(u32 nr, long ret)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct sc_t *s = sc_enter.lookup(&tid);
    if (!s)
        return;
    if (s->nr == nr && recording()) {
        struct lr_rec r = {};
        u64 now = bpf_ktime_get_ns();
        u64 dur = now - s->ts;
        if (dur > 0xffffffffffULL)
            dur = 0xffffffffffULL;
        r.x = nr | (((u32)s->a3 & 0xffffff) << 8);
        r.a = s->a0;
        r.b = s->a1;
        r.c = s->a2;
        r.d = (u64)ret;
        r.e = dur | ((((u64)s->a3 >> 24) & 0xff) << 40);
        emit(&r, K_SYSCALL);
    }
    sc_enter.delete(&tid);
}

#ifndef LR_NO_syscalls__sys_enter_mmap
TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
    sc_begin(0, args->addr, args->len, args->prot, args->flags);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_exit_mmap
TRACEPOINT_PROBE(syscalls, sys_exit_mmap)
{
    sc_finish(0, args->ret);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_enter_munmap
TRACEPOINT_PROBE(syscalls, sys_enter_munmap)
{
    sc_begin(1, args->addr, args->len, 0, 0);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_exit_munmap
TRACEPOINT_PROBE(syscalls, sys_exit_munmap)
{
    sc_finish(1, args->ret);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_enter_mprotect
TRACEPOINT_PROBE(syscalls, sys_enter_mprotect)
{
    sc_begin(2, args->start, args->len, args->prot, 0);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_exit_mprotect
TRACEPOINT_PROBE(syscalls, sys_exit_mprotect)
{
    sc_finish(2, args->ret);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_enter_madvise
TRACEPOINT_PROBE(syscalls, sys_enter_madvise)
{
    sc_begin(3, args->start, args->len_in, (u64)(u32)args->behavior, 0);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_exit_madvise
TRACEPOINT_PROBE(syscalls, sys_exit_madvise)
{
    sc_finish(3, args->ret);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_enter_mremap
TRACEPOINT_PROBE(syscalls, sys_enter_mremap)
{
    sc_begin(4, args->addr, args->old_len, args->new_len, args->flags);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_exit_mremap
TRACEPOINT_PROBE(syscalls, sys_exit_mremap)
{
    sc_finish(4, args->ret);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_enter_write
TRACEPOINT_PROBE(syscalls, sys_enter_write)
{
    sc_begin(5, (u32)args->fd, args->count, 0, 0);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_exit_write
TRACEPOINT_PROBE(syscalls, sys_exit_write)
{
    sc_finish(5, args->ret);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_enter_pwrite64
TRACEPOINT_PROBE(syscalls, sys_enter_pwrite64)
{
    sc_begin(6, (u32)args->fd, args->count, args->pos, 0);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_exit_pwrite64
TRACEPOINT_PROBE(syscalls, sys_exit_pwrite64)
{
    sc_finish(6, args->ret);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_enter_ftruncate
TRACEPOINT_PROBE(syscalls, sys_enter_ftruncate)
{
    sc_begin(7, (u32)args->fd, args->length, 0, 0);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_exit_ftruncate
TRACEPOINT_PROBE(syscalls, sys_exit_ftruncate)
{
    sc_finish(7, args->ret);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_enter_fallocate
TRACEPOINT_PROBE(syscalls, sys_enter_fallocate)
{
    sc_begin(8, (u32)args->fd, args->len, args->offset, (u32)args->mode);
    return 0;
}
#endif
#ifndef LR_NO_syscalls__sys_exit_fallocate
TRACEPOINT_PROBE(syscalls, sys_exit_fallocate)
{
    sc_finish(8, args->ret);
    return 0;
}
#endif

/* ---------------------------------------------------------------- file content changes (any writer) */

static __always_inline void file_rec(u32 event, u64 dev, u64 ino, s64 pos, s64 len)
{
    struct lr_rec r = {};
    r.x = event;
    r.a = dev;
    r.b = ino;
    r.c = (u64)pos;
    r.d = (u64)len;
    emit(&r, K_FILE);
}

#ifndef LR_NO_ext4__ext4_write_begin
TRACEPOINT_PROBE(ext4, ext4_write_begin)
{
    if (!recording() || !not_self())
        return 0;
    file_rec(FE_WRITE_BEGIN, args->dev, args->ino, args->pos, args->len);
    return 0;
}
#endif

#ifndef LR_NO_ext4__ext4_da_write_begin
TRACEPOINT_PROBE(ext4, ext4_da_write_begin)
{
    if (!recording() || !not_self())
        return 0;
    file_rec(FE_WRITE_BEGIN, args->dev, args->ino, args->pos, args->len);
    return 0;
}
#endif

#ifndef LR_NO_ext4__ext4_truncate_enter
TRACEPOINT_PROBE(ext4, ext4_truncate_enter)
{
    if (!recording() || !not_self())
        return 0;
    file_rec(FE_TRUNCATE, args->dev, args->ino, -1, -1);
    return 0;
}
#endif

#ifndef LR_NO_writeback__writeback_dirty_folio
TRACEPOINT_PROBE(writeback, writeback_dirty_folio)
{
    if (!recording() || !not_self())
        return 0;
    file_rec(FE_DIRTY_FOLIO, 0, args->ino, args->index, -1);
    return 0;
}
#endif

/* ---------------------------------------------------------------- scheduling and process lifecycle */

#ifndef LR_NO_sched__sched_switch
TRACEPOINT_PROBE(sched, sched_switch)
{
    if (!recording())
        return 0;
    {
        /* current is still prev here: charge the time since this CPU's last switch to the recorder. */
        int z = 0;
        struct self_run_t *sr = self_run.lookup(&z);
        if (sr) {
            u64 now = bpf_ktime_get_ns();
            if (!not_self() && sr->last_switch) {
                sr->ns += now - sr->last_switch;
                sr->slices++;
            }
            sr->last_switch = now;
        }
    }
    /* kswapd and kdamond never enter a reclaim bracket: tag them by comm when they are switched in. */
    char nc[8] = {};
    bpf_probe_read_kernel(&nc, sizeof(nc), args->next_comm);
    u8 tag = 0;
    if (nc[0] == 'k' && nc[1] == 's' && nc[2] == 'w' && nc[3] == 'a' && nc[4] == 'p' && nc[5] == 'd')
        tag = CTX_KSWAPD;
    else if (nc[0] == 'k' && nc[1] == 'd' && nc[2] == 'a' && nc[3] == 'm' && nc[4] == 'o' && nc[5] == 'n' &&
             nc[6] == 'd')
        tag = CTX_PROACTIVE;
    if (tag) {
        u32 npid = args->next_pid;
        if (!task_ctx.lookup(&npid)) {
            struct task_ctx_t n = {};
            n.ctx = tag;
            task_ctx.update(&npid, &n);
        }
    }
    struct lr_rec r = {};
    r.a = (u32)args->next_pid;
    r.b = (u64)args->prev_state;
    bpf_probe_read_kernel(&r.c, 16, args->prev_comm);
    emit(&r, K_SCHED_SWITCH);
    return 0;
}
#endif

#ifndef LR_NO_task__task_newtask
TRACEPOINT_PROBE(task, task_newtask)
{
    if (!recording())
        return 0;
    u32 parent_tgid = bpf_get_current_pid_tgid() >> 32;
    u32 child = args->pid;
    int thread = (args->clone_flags & LR_CLONE_THREAD) != 0;
#ifdef LR_FILTER
    if (!thread && targets.lookup(&parent_tgid)) {
        u8 one = 1;
        targets.update(&child, &one);
    }
#endif
    struct lr_rec r = {};
    r.x = PR_FORK;
    r.a = child;
    r.b = thread ? parent_tgid : child;
    bpf_probe_read_kernel(&r.c, 16, args->comm);
    emit(&r, K_PROC);
    return 0;
}
#endif

#ifndef LR_NO_sched__sched_process_exec
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    if (!recording())
        return 0;
    struct lr_rec r = {};
    r.x = PR_EXEC;
    r.a = (u64)-1;
    r.b = (u64)-1;
    bpf_get_current_comm(&r.c, 16);
    emit(&r, K_PROC);
    return 0;
}
#endif

#ifndef LR_NO_sched__sched_process_exit
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    if (!recording())
        return 0;
    u32 tid = bpf_get_current_pid_tgid();
    task_ctx.delete(&tid);
    sc_enter.delete(&tid);
    struct lr_rec r = {};
    r.x = PR_EXIT;
    r.a = (u64)-1;
    r.b = (u64)-1;
    bpf_probe_read_kernel(&r.c, 16, args->comm);
    emit(&r, K_PROC);
    return 0;
}
#endif

/* ---------------------------------------------------------------- exact tier (kprobes on the rmap walk) */

/* Compiled in with LR_EXACT only: a kernel with kprobes whose headers match the running kernel (bcc compiles
 * against them, so the struct reads below use the right offsets; lufreplay/capture/probes.py checks both).
 * Every PTE or PMD that try_to_unmap_one (reclaim) or try_to_migrate_one (migration) is about to clear is the
 * one page_vma_mapped_walk just returned true for: its return probe reads the entry itself under the page
 * table lock, before the clear, and emits one K_PTE_EXACT record per entry (the rss_stat or set_migration_pte
 * row of the same task follows):
 *   x = op (1 unmap, 2 migrate) | level << 4 (0 PTE, 1 PMD) | (vm_flags & 0xff) << 8
 *   a = user address, b = the entry's raw value, c = pfn the walk looks for (the folio's),
 *   d = tgid of mm->owner (the process whose mm it is; 0 unknown), e = pages of the folio
 * Nothing else in this file depends on this section. */
#ifdef LR_EXACT
#include <linux/mm_types.h>
#include <linux/rmap.h>
#include <linux/sched.h>

#define EX_UNMAP 1
#define EX_MIGRATE 2

BPF_HASH(ex_in, u32, u8, 16384);    /* tid -> EX_* while inside try_to_unmap_one / try_to_migrate_one */
BPF_HASH(ex_walk, u32, u64, 16384); /* tid -> the page_vma_mapped_walk of the call in flight */

static __always_inline int ex_enter(u8 op)
{
    if (!recording())
        return 0;
    u32 tid = bpf_get_current_pid_tgid();
    ex_in.update(&tid, &op);
    return 0;
}

int lr_ex_unmap_one(struct pt_regs *ctx)
{
    return ex_enter(EX_UNMAP);
}

int lr_ex_migrate_one(struct pt_regs *ctx)
{
    return ex_enter(EX_MIGRATE);
}

int lr_ex_one_ret(struct pt_regs *ctx)
{
    u32 tid = bpf_get_current_pid_tgid();
    ex_in.delete(&tid);
    ex_walk.delete(&tid);
    return 0;
}

int lr_ex_walk(struct pt_regs *ctx, struct page_vma_mapped_walk *pvmw)
{
    u32 tid = bpf_get_current_pid_tgid();
    if (!ex_in.lookup(&tid))
        return 0; /* folio_referenced_one, page_mkclean_one ...: not an unmap */
    u64 p = (u64)pvmw;
    ex_walk.update(&tid, &p);
    return 0;
}

int lr_ex_walk_ret(struct pt_regs *ctx)
{
    u32 tid = bpf_get_current_pid_tgid();
    u64 *pp = ex_walk.lookup(&tid);
    if (!pp)
        return 0;
    u64 p = *pp;
    ex_walk.delete(&tid);
    u8 *op = ex_in.lookup(&tid);
    /* page_vma_mapped_walk returns bool: only %al is defined */
    if (!op || !(PT_REGS_RC(ctx) & 0xff) || !recording())
        return 0;
    struct page_vma_mapped_walk w = {};
    bpf_probe_read_kernel(&w, sizeof(w), (void *)p);
    u64 val = 0;
    u32 level = 0;
    if (w.pte) {
        bpf_probe_read_kernel(&val, sizeof(val), w.pte);
    } else if (w.pmd) {
        bpf_probe_read_kernel(&val, sizeof(val), w.pmd);
        level = 1;
    }
    struct mm_struct *mm = NULL;
    unsigned long vm_flags = 0;
    bpf_probe_read_kernel(&mm, sizeof(mm), &w.vma->vm_mm);
    bpf_probe_read_kernel(&vm_flags, sizeof(vm_flags), &w.vma->vm_flags);
    u32 owner = 0;
#ifdef CONFIG_MEMCG
    struct task_struct *t = NULL;
    if (mm) {
        bpf_probe_read_kernel(&t, sizeof(t), &mm->owner);
        if (t)
            bpf_probe_read_kernel(&owner, sizeof(owner), &t->tgid);
    }
#endif
    struct lr_rec r = {};
    r.x = (*op & 0xf) | (level << 4) | ((u32)(vm_flags & 0xff) << 8);
    r.a = w.address;
    r.b = val;
    r.c = w.pfn;
    r.d = owner;
    r.e = w.nr_pages;
    emit(&r, K_PTE_EXACT);
    return 0;
}
#endif

/* Compiled in with LR_SHOOT only (see note_sender): a kernel without csd:csd_queue_cpu, with fentry or kprobes and
 * headers of the running kernel (the flush_tlb_info offset). One record per remote call of the flush function,
 * written as the sender's csd_queue_cpu record would be: the sender's CPU and task, 1 ns after its send row,
 * a = the receiving CPU, b = 0 (no call site). fentry (LR_SHOOT_FENTRY, attached by bcc as it loads) is
 * preferred: a trampoline skips a run only while the same program runs on that CPU, where a kprobe is skipped
 * whenever any kprobe or classic-tracepoint program is running there (the IPI interrupts it). */
#ifdef LR_SHOOT
#include <asm/tlbflush.h>

static __always_inline int shoot_recv(const struct flush_tlb_info *f)
{
    if (!recording())
        return 0;
    u32 from = 0;
    bpf_probe_read_kernel(&from, sizeof(from), &f->initiating_cpu);
    u32 me = bpf_get_smp_processor_id();
    if (from == me)
        return 0; /* the sender's own call: a local flush */
    if (from >= LR_NR_CPU_IDS) {
        /* not a CPU id: the offset is not this kernel's; counted as a loss rather than written as a bad row */
        u32 k = K_CSD_QUEUE_CPU;
        u64 *v = lost.lookup(&k);
        if (v)
            (*v)++;
        return 0;
    }
    struct lr_rec r = {};
    r.a = me;
    struct sender_t *s = shoot_from.lookup(&from);
    if (!s || !s->ts) {
        emit_as(&r, K_CSD_QUEUE_CPU, bpf_ktime_get_ns(), 0, from); /* a send before the recording began */
        return 0;
    }
    if ((u32)(s->pt >> 32) == LR_SELF_TGID) {
        u64 *n = self_sent.lookup(&from);
        if (n)
            lock_xadd(n, 1);
    }
    emit_as(&r, K_CSD_QUEUE_CPU, s->ts + 1, s->pt, from);
    return 0;
}

int lr_shoot_recv(struct pt_regs *ctx)
{
    return shoot_recv((const struct flush_tlb_info *)PT_REGS_PARM1(ctx));
}

#ifdef LR_SHOOT_FENTRY
KFUNC_PROBE(flush_tlb_func, void *info)
{
    return shoot_recv((const struct flush_tlb_info *)info);
}
#endif
#endif
