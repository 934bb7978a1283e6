/* Shared by every attach plan: the flow maps, the in-kernel filter and per-packet accounting.
 *
 * Struct members are never dereferenced through kernel headers: bcc may compile against
 * headers of another kernel, so every offset arrives as an OFF_* define (see offsets.py).
 * Configuration arrives the same way: FILTER_*, MAX_FLOWS, RING_PAGES.
 *
 * Exactness. Packets are counted in one of two plain hash maps (flows0/flows1), chosen by the
 * epoch in control[0]. User space drains the map that is NOT in use (lookup-and-delete in
 * batches) and only then flips the epoch, so a delete never races an increment: a program that
 * found an entry a moment before the flip finishes long before that map is drained, one
 * interval later. A full map fails the insert (plain hash, not LRU: nothing is evicted
 * silently) and the packet is counted as lost, in packets and bytes.
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#ifdef OFFSETS_FROM_HEADERS
/* The running kernel's own headers: OFF_* are offsetof() expressions over these. */
#include <linux/skbuff.h>
#include <linux/netdevice.h>
#include <linux/nsproxy.h>
#include <net/net_namespace.h>
#include <net/route.h>
#include <net/sock.h>
#include <net/flow.h>
#include <net/ip_fib.h>
#include <net/ip6_fib.h>
#endif

#define DEVNAME_LEN 16
#define LOOPBACK_IFINDEX 1
#define NETDEV_IFF_LOOPBACK 0x8
#define ETHERTYPE_IP 0x0800
#define ETHERTYPE_IPV6 0x86DD
#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMPV6 58
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_DEST 60
#define AF_INET6_ 10
#define RTF_REJECT_ 0x0200
#define RTF_ANYCAST_ 0x00100000
#define RTF_LOCAL_ 0x80000000
#define RTN_UNICAST_ 1
#define RTN_LOCAL_ 2
#define RTN_ANYCAST_ 4
#define RTN_MULTICAST_ 5
#define RTN_UNREACHABLE_ 7

#ifdef PACKET_CASTS
#define PACKET_CASTS_ON 1
#else
#define PACKET_CASTS_ON 0
#define BTF_ID_IPHDR 0
#define BTF_ID_IPV6HDR 0
#define BTF_ID_UDPHDR 0
#define BTF_ID_SKB_SHARED_INFO 0
#endif

#define MIN2(a, b) ((a) < (b) ? (a) : (b))
#define MAX2(a, b) ((a) > (b) ? (a) : (b))

/* One entry per (flow, transmit device): the device is part of the key, so a packet costs
 * one hash lookup and a flow seen on two devices is two entries user space merges. */
struct flow_key {
    u32 netns;
    u32 ifindex;                      /* transmit device */
    u8 saddr[16];                     /* network byte order; IPv4 uses the first 4 bytes */
    u8 daddr[16];
    u16 sport;                        /* host byte order */
    u16 dport;
    u8 proto;
    u8 family;                        /* 4 or 6 */
    u16 pad;
};

enum route_source { ROUTE_NONE, ROUTE_FROM_PACKET, ROUTE_FROM_SOCKET, ROUTE_FROM_LOOKUP };

#define FLOW_HAS_FIB 0x01
#define FLOW_ROUTE_LOOPBACK 0x02      /* the route's device has IFF_LOOPBACK */
#define FLOW_DEV_LOOPBACK 0x04        /* the transmit device has IFF_LOOPBACK */
#define FLOW_V4_MAPPED_SOCKET 0x08    /* an IPv4 packet from an AF_INET6 socket (::ffff:a.b.c.d) */
#define FLOW_CONTINUED 0x10           /* the same key was in the previous epoch's map */

struct flow_value {
    u64 packets;                      /* skbs handed to the device */
    u64 bytes;
    u64 segments;                     /* GSO segments: what the wire carries */
    u64 fragments;                    /* non-first fragments among the packets */
    u64 first_ns;
    u32 pid;
    u32 fib_table;
    u32 route_ifindex;
    u32 fib_ifindex;
    u16 route_type;
    u8 route_src;
    u8 flags;
    u32 pad;
    char comm[TASK_COMM_LEN];
    char dev[DEVNAME_LEN];            /* transmit device's name when the entry was made */
    char route_dev[DEVNAME_LEN];
    char fib_dev[DEVNAME_LEN];
};

struct fib_key {
    u32 netns;
    u8 family;
    u8 pad[3];
    u8 daddr[16];
};

struct fib_value {
    u32 table;
    u32 ifindex;
    char dev[DEVNAME_LEN];
};

/* Non-first fragments carry no ports: the first fragment leaves its ports here. */
struct frag_key {
    u32 netns;
    u32 id;
    u8 saddr[16];
    u8 daddr[16];
    u8 proto;
    u8 family;
    u16 pad;
};

struct frag_ports {
    u16 sport;
    u16 dport;
};

/* The per-CPU flow cache: the last few (flow, device) entries each CPU counted, by epoch, with the
 * packets counted to them since. A packet of a cached flow costs no hash lookup (a 48-byte key's
 * jhash, bucket walk and compare: ~70 ns of a ~150 ns program) and no atomic: a compare and four
 * per-CPU adds. A slot's key always has an entry in that epoch's map (it is installed after the
 * entry was found or made), and its counts belong to that entry: written back when another flow
 * takes the slot, and otherwise added by user space when it drains that epoch's map (the
 * epoch is not in use then, so no program writes its slots), which also empties the slots. */
#ifndef FLOW_CACHE_SLOTS
#define FLOW_CACHE_SLOTS 64           /* per CPU and epoch; a power of two */
#endif

struct cached_flow {
    struct flow_key key;              /* family 0: an empty slot */
    u64 packets;
    u64 bytes;
    u64 segments;
    u64 fragments;
};

/* A hint for prompt streaming only: counts always come from draining the maps. */
struct new_flow_event {
    struct flow_key key;
    struct flow_value value;
};

enum stat_index {
    STAT_EVENTS_DROPPED,              /* ring buffer full: a flow is streamed late, not lost */
    STAT_LOST_PACKETS,                /* flow map full: packets not counted */
    STAT_LOST_BYTES,
    STAT_UNDECODED,                   /* packets of families/protocols not decoded */
    STAT_CREATED_0,                   /* entries made in flows0 / flows1 since their drain */
    STAT_CREATED_1,
    STAT_ROUTE_UNPAIRED,              /* kprobe plan: a route lookup's entry and return not paired */
    STAT_MAX,
};

#ifndef MAX_FLOWS
#define MAX_FLOWS 65536
#endif
#ifndef RING_PAGES
#define RING_PAGES 1024
#endif

BPF_HASH(flows0, struct flow_key, struct flow_value, MAX_FLOWS);
BPF_HASH(flows1, struct flow_key, struct flow_value, MAX_FLOWS);
BPF_ARRAY(control, u32, 1);
BPF_PERCPU_ARRAY(stats, u64, STAT_MAX);
BPF_PERCPU_ARRAY(scratch, struct flow_value, 1);
BPF_PERCPU_ARRAY(flow_cache, struct cached_flow, 2 * FLOW_CACHE_SLOTS);
/* Context, not counts: an evicted answer only leaves a flow without its FIB column. */
BPF_TABLE("lru_hash", struct fib_key, struct fib_value, fib_answers, 16384);
BPF_TABLE("lru_hash", struct frag_key, struct frag_ports, frag_ports_map, 4096);
BPF_RINGBUF_OUTPUT(new_flows, RING_PAGES);
/* When this CPU last let a notice wake the reader (see notify_new_flow). */
BPF_PERCPU_ARRAY(last_wakeup, u64, 1);
#define WAKEUP_INTERVAL_NS 10000000ULL

#ifdef ROUTE_DECISIONS
/* The kprobe plan's record of the routing function's answers (IPv4 only), by the flow each
 * lookup was made for: a flow is given the answer to its own lookup, not to another socket's
 * lookup for the same destination (bound to another device, another mark, another VRF). */
struct route_key {
    u32 netns;
    u32 saddr;                        /* network byte order */
    u32 daddr;
    u16 sport;                        /* host byte order, as in flow_key; 0 unless TCP or UDP */
    u16 dport;
    u8 proto;
    u8 pad[3];
};

struct route_value {
    u16 rt_type;
    u8 loopback;
    u8 pad;
    u32 ifindex;
    char dev[DEVNAME_LEN];
};

BPF_TABLE("lru_hash", struct route_key, struct route_value, route_answers, 4096);
#endif

static __always_inline void count_stat(int idx, u64 n)
{
    u64 *v = stats.lookup(&idx);
    if (v)
        *v += n;                      /* per-CPU: no atomics */
}

/* Packet data by plain loads (PACKET_CASTS: the BTF-typed hook, 6.2+). skb->head is a plain
 * `unsigned char *`, so what it points to is unknown memory to the verifier: reading the headers
 * took a bpf_probe_read_kernel call, and the GSO count (skb_shinfo, at head + end) another, the
 * two helper calls left on a known flow's packet. bpf_rdonly_cast gives an address a BTF type
 * (iphdr, udphdr, ...) as a read-only untrusted pointer, and the verifier inlines it into a
 * register move: each field is then one load that reads 0 on a fault. bcc cannot emit a kfunc
 * call, so the call goes to a marker number that tracer.py rewrites into the kfunc's
 * (bpfsys.link_kfunc_calls) before loading. */
#ifdef PACKET_CASTS
#define PACKET_CAST(addr, type_id) \
    ((const u8 *(*)(u64, u32))KFUNC_RDONLY_CAST_MARK)((u64)(addr), (type_id))
#endif

/* size bytes of packet data at src: a cast pointer to them (direct, PACKET_CASTS) or a copy in
 * buf; 0 when they cannot be read. */
static __always_inline const u8 *packet_bytes(u8 *buf, const int size, const void *src, const u32 type_id,
                                              const int direct)
{
#ifdef PACKET_CASTS
    if (direct)
        return PACKET_CAST(src, type_id);
#endif
    return bpf_probe_read_kernel(buf, size, src) ? 0 : buf;
}

static __always_inline void *read_ptr(void *base, int off)
{
    void *p = 0;
    bpf_probe_read_kernel(&p, sizeof(p), base + off);
    return p;
}

static __always_inline u32 netns_of_net(void *net)
{
    u32 inum = 0;
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), net + OFF_NET_INUM);
    return inum;
}

static __always_inline u32 netns_of_dev(void *dev)
{
    return dev ? netns_of_net(read_ptr(dev, OFF_NETDEV_NET)) : 0;
}

/* A transmit device's ifindex and namespace pointer, in one read where the kernel keeps them
 * close (6.x: 40 bytes apart); two reads elsewhere. Per packet, every read counts (~20-30 ns).
 * direct: the device came from a BTF-typed tracepoint's skb, so the verifier knows its type and
 * plain loads read it (a fault reads as 0) -- no helper call at all. */
#define DEV_WIN_BASE MIN2(OFF_NETDEV_IFINDEX, OFF_NETDEV_NET)
#define DEV_WIN_SPAN (MAX2(OFF_NETDEV_IFINDEX + 4, OFF_NETDEV_NET + 8) - DEV_WIN_BASE)
#define DEV_WIN_MAX 64

static __always_inline u32 dev_netns(void *dev, u32 *ifindex, const int direct)
{
    if (direct) {
        *ifindex = *(u32 *)((u8 *)dev + OFF_NETDEV_IFINDEX);
        void *net = *(void **)((u8 *)dev + OFF_NETDEV_NET);
        return net ? *(u32 *)((u8 *)net + OFF_NET_INUM) : 0;
    }
    if (DEV_WIN_SPAN <= DEV_WIN_MAX) {
        u64 w[DEV_WIN_MAX / 8];
        if (bpf_probe_read_kernel(w, DEV_WIN_SPAN <= DEV_WIN_MAX ? DEV_WIN_SPAN : DEV_WIN_MAX, dev + DEV_WIN_BASE))
            return 0;
        *ifindex = *(u32 *)((u8 *)w + OFF_NETDEV_IFINDEX - DEV_WIN_BASE);
        return netns_of_net(*(void **)((u8 *)w + OFF_NETDEV_NET - DEV_WIN_BASE));
    }
    bpf_probe_read_kernel(ifindex, sizeof(*ifindex), dev + OFF_NETDEV_IFINDEX);
    return netns_of_net(read_ptr(dev, OFF_NETDEV_NET));
}

/* size bytes at src: a plain copy when src is a BTF-typed pointer (direct; the verifier checks
 * each load against BTF and a fault reads as 0), else a helper call. direct and size are
 * constants at every call site once inlined. */
static __always_inline void kread(void *dst, const int size, const void *src, const int direct)
{
    /* Loads of the member's own width: memcpy from a void * would be split into byte loads,
     * which the verifier refuses on a pointer member. */
    if (direct && size == 1)
        *(u8 *)dst = *(const u8 *)src;
    else if (direct && size == 2)
        *(u16 *)dst = *(const u16 *)src;
    else if (direct && size == 4)
        *(u32 *)dst = *(const u32 *)src;
    else if (direct && size == 8)
        *(u64 *)dst = *(const u64 *)src;
    else if (direct && size == 16) {
        ((u64 *)dst)[0] = ((const u64 *)src)[0];
        ((u64 *)dst)[1] = ((const u64 *)src)[1];
    } else
        bpf_probe_read_kernel(dst, size, src);
}

static __always_inline u32 dev_loopback(void *dev, const int direct)
{
    u32 flags = 0;
    kread(&flags, sizeof(flags), dev + OFF_NETDEV_FLAGS, direct);
    return flags & NETDEV_IFF_LOOPBACK;
}

static __always_inline int port_matches(u16 sport, u16 dport)
{
#ifdef FILTER_PORT
    return sport == FILTER_PORT || dport == FILTER_PORT;
#else
    return 1;
#endif
}

static __always_inline int family_matches(u8 family)
{
#ifdef FILTER_FAMILY
    return family == FILTER_FAMILY;
#else
    return 1;
#endif
}

#ifdef FILTER_HOST_FAMILY
static __always_inline int addr_is_host(const u8 *a)
{
    u32 w[4];
    __builtin_memcpy(w, a, 16);
    return w[0] == FILTER_HOST_W0 && w[1] == FILTER_HOST_W1 && w[2] == FILTER_HOST_W2 && w[3] == FILTER_HOST_W3;
}
#endif

static __always_inline int host_matches(u8 family, const u8 *saddr, const u8 *daddr)
{
#ifdef FILTER_HOST_FAMILY
    return family == FILTER_HOST_FAMILY && (addr_is_host(saddr) || addr_is_host(daddr));
#else
    return 1;
#endif
}

static __always_inline int netns_matches(u32 netns)
{
#ifdef FILTER_NETNS
    return netns == FILTER_NETNS;
#else
    return 1;
#endif
}

/* A route lookup's flow (ports in network order, as flowi holds them) against the filters.
 * connect() looks up its route before the source port exists: a zero port cannot be filtered. */
static __always_inline int lookup_matches(u8 family, const u8 *saddr, const u8 *daddr, u16 sport_be, u16 dport_be)
{
    u16 sport = bpf_ntohs(sport_be), dport = bpf_ntohs(dport_be);
    if ((sport || dport) && !port_matches(sport, dport))
        return 0;
    return family_matches(family) && host_matches(family, saddr, daddr);
}

/* The FIB's answer for a destination, kept so a flow can show "FIB said eth0, sent on lo".
 * The namespace comes from the lookup itself (its nexthop device or its net), never from
 * `current`: replies are looked up in softirq while another namespace's task runs. */
static __always_inline void remember_fib(u32 netns, u8 family, const u8 *daddr, u32 table, void *nh_dev)
{
    struct fib_key k = {.netns = netns, .family = family};
    __builtin_memcpy(k.daddr, daddr, 16);
    struct fib_value v = {.table = table};
    if (nh_dev) {
        bpf_probe_read_kernel(&v.ifindex, sizeof(v.ifindex), nh_dev + OFF_NETDEV_IFINDEX);
        bpf_probe_read_kernel(&v.dev, DEVNAME_LEN, nh_dev + OFF_NETDEV_NAME);
    }
    fib_answers.update(&k, &v);
}

/* The route a packet was given. The skb's dst is the route the output lookup chose (dst is the
 * first member of rtable and rt6_info) -- but __dev_queue_xmit drops it before net_dev_queue
 * fires on devices with IFF_XMIT_DST_RELEASE (veth, NICs; not lo). Then the sending socket's
 * cached route is the same decision: TCP and connected UDP sockets keep it in sk_dst_cache. */
#define TCP_TIME_WAIT 6
#define TCP_NEW_SYN_RECV 12

static __always_inline void *route_of(void *refdst, void *sk, u8 *src, const int direct)
{
    void *rt = (void *)((unsigned long)refdst & ~1UL);
    if (rt) {
        *src = ROUTE_FROM_PACKET;
        return rt;
    }
    if (!sk)
        return 0;
    u8 state = 0;
    kread(&state, sizeof(state), sk + OFF_SK_STATE, direct);
    if (state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV)   /* not a full socket */
        return 0;
    kread(&rt, sizeof(rt), sk + OFF_SK_DST_CACHE, direct);
    if (rt)
        *src = ROUTE_FROM_SOCKET;
    return rt;
}

/* rtable has rt_type; rt6_info says the same in its flags. */
static __always_inline u16 route_type_of(void *rt, u8 family, const u8 *daddr)
{
    if (family == 4) {
        u8 t = 0;
        bpf_probe_read_kernel(&t, sizeof(t), rt + OFF_RTABLE_RT_TYPE);
        return t;
    }
    u32 flags = 0;
    bpf_probe_read_kernel(&flags, sizeof(flags), rt + OFF_RT6_FLAGS);
    if (flags & RTF_LOCAL_)
        return RTN_LOCAL_;
    if (flags & RTF_REJECT_)
        return RTN_UNREACHABLE_;
    if (flags & RTF_ANYCAST_)
        return RTN_ANYCAST_;
    if (daddr[0] == 0xff)
        return RTN_MULTICAST_;
    return RTN_UNICAST_;
}

static __always_inline void describe_route(struct flow_value *v, void *rt, u8 family, const u8 *daddr)
{
    v->route_type = route_type_of(rt, family, daddr);
    void *rdev = read_ptr(rt, OFF_DST_DEV);
    if (rdev) {
        bpf_probe_read_kernel(&v->route_ifindex, sizeof(v->route_ifindex), rdev + OFF_NETDEV_IFINDEX);
        bpf_probe_read_kernel(&v->route_dev, DEVNAME_LEN, rdev + OFF_NETDEV_NAME);
        if (dev_loopback(rdev, 0))
            v->flags |= FLOW_ROUTE_LOOPBACK;
    }
}

/* The kprobe plan: what the routing function itself returned for this very flow (the lookup
 * made with its addresses, ports and protocol), as its kretprobe saw it -- used only when neither
 * the packet nor its socket carries the route. A connect() routes with source port 0 first and
 * again with the chosen port (ip_route_newports): the last lookup has the packet's full tuple. */
static __always_inline int route_decided(struct flow_key *key, struct flow_value *v)
{
#ifdef ROUTE_DECISIONS
    if (key->family != 4)
        return 0;
    struct route_key rk = {.netns = key->netns, .proto = key->proto};
    __builtin_memcpy(&rk.saddr, key->saddr, 4);
    __builtin_memcpy(&rk.daddr, key->daddr, 4);
    if (key->proto == PROTO_TCP || key->proto == PROTO_UDP) {
        rk.sport = key->sport;
        rk.dport = key->dport;
    }
    struct route_value *decided = route_answers.lookup(&rk);
    if (decided) {
        v->route_src = ROUTE_FROM_LOOKUP;
        v->route_type = decided->rt_type;
        v->route_ifindex = decided->ifindex;
        if (decided->loopback)
            v->flags |= FLOW_ROUTE_LOOPBACK;
        __builtin_memcpy(v->route_dev, decided->dev, DEVNAME_LEN);
        return 1;
    }
#endif
    return 0;
}

static __always_inline struct flow_value *lookup_flow(u32 epoch, struct flow_key *key)
{
    return epoch ? flows1.lookup(key) : flows0.lookup(key);
}

/* A key's slot among its CPU's FLOW_CACHE_SLOTS: a cheap mix in which a flow and its reply (ports
 * and addresses swapped) differ, since both are often sent on one CPU. */
static __always_inline u32 cache_slot(const struct flow_key *k)
{
    const u32 *s = (const u32 *)k->saddr, *d = (const u32 *)k->daddr;
    u32 h = k->ifindex + s[0] * 3 + s[3] * 5 + d[0] * 7 + d[3] * 11 + (u32)k->sport * 13 + (u32)k->dport * 17 +
            k->proto;
    h ^= h >> 16;
    h ^= h >> 8;
    return h & (FLOW_CACHE_SLOTS - 1);
}

/* Both 8-byte aligned: six words (flow_key is 48 bytes, its pad zeroed). */
static __always_inline int same_key(const struct flow_key *a, const struct flow_key *b)
{
    const u64 *x = (const u64 *)a, *y = (const u64 *)b;
    return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4] && x[5] == y[5];
}

/* A slot taken by another flow: its counts go to its entry first. The entry is there (see
 * struct cached_flow); were it not, the packets would be counted as lost, never dropped. */
static __always_inline void write_back(u32 epoch, struct cached_flow *c)
{
    if (!c->packets)
        return;
    struct flow_value *fv = lookup_flow(epoch, &c->key);
    if (fv) {
        __sync_fetch_and_add(&fv->packets, c->packets);
        __sync_fetch_and_add(&fv->bytes, c->bytes);
        __sync_fetch_and_add(&fv->segments, c->segments);
        if (c->fragments)
            __sync_fetch_and_add(&fv->fragments, c->fragments);
    } else {
        count_stat(STAT_LOST_PACKETS, c->packets);
        count_stat(STAT_LOST_BYTES, c->bytes);
    }
    c->packets = 0;
    c->bytes = 0;
    c->segments = 0;
    c->fragments = 0;
}

/* Reserved and submitted in one place: older verifiers (6.1) lose track of a reservation
 * held across other branches. A submit that wakes the reader costs an irq_work and a context
 * switch; one notice per CPU per WAKEUP_INTERVAL_NS wakes it, the others wait for that wakeup
 * (or the reader's poll timeout: user space reads the ring at every pump). */
static __always_inline void notify_new_flow(struct flow_key *key, struct flow_value *v)
{
    /* Decided before the reservation: nothing but copies between reserve and submit. */
    u64 flags = BPF_RB_NO_WAKEUP;
    int zero = 0;
    u64 *last = last_wakeup.lookup(&zero);
    if (last && v->first_ns - *last >= WAKEUP_INTERVAL_NS) {
        *last = v->first_ns;
        /* Forced: the default wakes the reader only when the ring was empty before this
         * notice, which after notices without a wakeup it is not. */
        flags = BPF_RB_FORCE_WAKEUP;
    }
    struct new_flow_event *ev = new_flows.ringbuf_reserve(sizeof(*ev));
    if (!ev) {
        count_stat(STAT_EVENTS_DROPPED, 1);
        return;
    }
    ev->key = *key;
    ev->value = *v;
    /* The entry holds its first packet's counts; the drain reports them, not the notice. */
    ev->value.packets = 0;
    ev->value.bytes = 0;
    ev->value.segments = 0;
    ev->value.fragments = 0;
    new_flows.ringbuf_submit(ev, flags);
}

enum create_result { FLOW_CREATED, FLOW_RACED, FLOW_NOT_CREATED, FLOW_FILTERED };

/* The first packet of a (flow, device) in this epoch: everything that does not change per
 * packet is read once, here, and the entry is inserted holding that packet's counts (no
 * lookup after the insert, no atomics). FLOW_RACED: another CPU inserted the same key first,
 * count into its entry; FLOW_NOT_CREATED: the map is full. */
static __always_inline int create_flow(u32 epoch, struct flow_key *key, void *dev, void *refdst, void *sk,
                                       u64 bytes, u16 segments, u8 is_fragment, const int direct)
{
#ifdef FILTER_PID
    if ((bpf_get_current_pid_tgid() >> 32) != FILTER_PID)
        return FLOW_FILTERED;
#endif
    int zero = 0;
    struct flow_value *v = scratch.lookup(&zero);
    if (!v)
        return FLOW_NOT_CREATED;
    __builtin_memset(v, 0, sizeof(*v));
    v->packets = 1;
    v->bytes = bytes;
    v->segments = segments;
    v->fragments = is_fragment;
    v->first_ns = bpf_ktime_get_ns();
    v->pid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(&v->comm, sizeof(v->comm));
    kread(&v->dev, DEVNAME_LEN, dev + OFF_NETDEV_NAME, direct);
    if (dev_loopback(dev, direct))
        v->flags |= FLOW_DEV_LOOPBACK;

    u8 src = ROUTE_NONE;
    void *rt = route_of(refdst, sk, &src, direct);
#ifdef ROUTE_PREFER_LOOKUP
    /* Test mode (ROUTETRACE_PREFER_LOOKUP=1, kprobe plan): the flow's own paired lookup before the
     * packet's route, which every packet still carries at __dev_queue_xmit's entry -- so the VM
     * tests check the per-call pairing on real traffic. */
    if (route_decided(key, v))
        rt = 0;
    else
#endif
    if (rt) {
        v->route_src = src;
        describe_route(v, rt, key->family, key->daddr);
    } else {
        route_decided(key, v);
    }
    if (key->family == 4 && sk) {
        u16 socket_family = 0;   /* not "sk_family": a macro in net/sock.h */
        kread(&socket_family, sizeof(socket_family), sk + OFF_SK_FAMILY, direct);
        if (socket_family == AF_INET6_)
            v->flags |= FLOW_V4_MAPPED_SOCKET;
    }
    struct fib_key fk = {.netns = key->netns, .family = key->family};
    __builtin_memcpy(fk.daddr, key->daddr, 16);
    struct fib_value *fib = fib_answers.lookup(&fk);
    if (fib) {
        v->flags |= FLOW_HAS_FIB;
        v->fib_table = fib->table;
        v->fib_ifindex = fib->ifindex;
        __builtin_memcpy(v->fib_dev, fib->dev, DEVNAME_LEN);
    }
    /* Known to user space already when the previous epoch had it: no notice, and user space
     * can tell a continuing flow from a new one. */
    int continued = (epoch ? flows0.lookup(key) : flows1.lookup(key)) != 0;
    if (continued)
        v->flags |= FLOW_CONTINUED;

    int err = epoch ? flows1.insert(key, v) : flows0.insert(key, v);
    if (err == 0) {
        count_stat(epoch ? STAT_CREATED_1 : STAT_CREATED_0, 1);
        if (!continued)
            notify_new_flow(key, v);
        return FLOW_CREATED;
    }
    return err == -EEXIST ? FLOW_RACED : FLOW_NOT_CREATED;
}

/* IPv6 extension headers before the transport header: a few, bounded. Returns the transport
 * protocol and sets *off (from the network header) and the fragment fields. */
static __always_inline u8 skip_ipv6_ext(unsigned char *nh, u8 next, u32 *off, u32 *frag_id,
                                        u16 *frag_offset, u8 *more)
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST &&
            next != NEXTHDR_FRAGMENT)
            return next;
        u8 ext[8];
        if (bpf_probe_read_kernel(ext, sizeof(ext), nh + *off))
            return 255;
        if (next == NEXTHDR_FRAGMENT) {
            u16 fo = ((u16)ext[2] << 8) | ext[3];
            *frag_offset = fo >> 3;
            *more = fo & 1;
            __builtin_memcpy(frag_id, &ext[4], 4);
            *off += 8;
        } else {
            *off += ((u32)ext[1] + 1) * 8;
        }
        next = ext[0];
    }
    return 255;                        /* too many extension headers: not decoded */
}

/* The sk_buff fields read per packet. Through a raw tracepoint or a kprobe: fetched in one read
 * of the span that holds them. Through a BTF-typed tracepoint (direct): plain loads from the skb. */
#define SKB_WIN_BASE MIN2(MIN2(MIN2(OFF_SKB_DEV, OFF_SKB_SK), MIN2(OFF_SKB_REFDST, OFF_SKB_HEAD)), \
                          MIN2(MIN2(OFF_SKB_NETWORK_HEADER, OFF_SKB_PROTOCOL), MIN2(OFF_SKB_END, OFF_SKB_LEN)))
#define SKB_WIN_END MAX2(MAX2(MAX2(OFF_SKB_DEV + 8, OFF_SKB_SK + 8), MAX2(OFF_SKB_REFDST + 8, OFF_SKB_HEAD + 8)), \
                         MAX2(MAX2(OFF_SKB_NETWORK_HEADER + 2, OFF_SKB_PROTOCOL + 2), \
                              MAX2(OFF_SKB_END + 4, MAX2(OFF_SKB_LEN + 4, OFF_SKB_DATA + 8))))
#define SKB_FIELD(type, off) (direct ? *(type *)((u8 *)skb + (off)) : *(type *)(win + (off) - SKB_WIN_BASE))

/* Account one skb about to be transmitted to its (flow, device) entry. direct is a constant at
 * each call site (the function is inlined): 1 for a BTF-typed tracepoint's skb, else 0. */
static __always_inline int account_xmit(void *skb, const int direct)
{
    u8 win[SKB_WIN_END - SKB_WIN_BASE];
    if (!direct && bpf_probe_read_kernel(win, sizeof(win), skb + SKB_WIN_BASE))
        return 0;
    void *dev = SKB_FIELD(void *, OFF_SKB_DEV);
    if (!dev)
        return 0;
    struct flow_key key __attribute__((aligned(8))) = {};
    key.netns = dev_netns(dev, &key.ifindex, direct);
    if (!netns_matches(key.netns))
        return 0;

    u16 ethertype = bpf_ntohs(SKB_FIELD(u16, OFF_SKB_PROTOCOL));
    unsigned char *nh = SKB_FIELD(unsigned char *, OFF_SKB_HEAD) + SKB_FIELD(u16, OFF_SKB_NETWORK_HEADER);
    u8 hdr[48] __attribute__((aligned(8)));  /* an IPv6 header and the ports after it, or IPv4 + ports */
    const u8 *h;                       /* the network header: hdr, or a cast pointer to it */
    u32 l4off, frag_id = 0;
    u16 frag_offset = 0, ip_len = 0;
    u8 more_frags = 0;
    if (ethertype == ETHERTYPE_IP) {
        h = packet_bytes(hdr, sizeof(hdr), nh, BTF_ID_IPHDR, direct);
        if (!h || (h[0] >> 4) != 4 || (h[0] & 0x0f) < 5)
            goto undecoded;
        /* Each field in one load of its width (through a cast pointer each load is a checked
         * one: fewer of them, not byte by byte). */
        key.family = 4;
        key.proto = h[9];
        *(u32 *)key.saddr = *(const u32 *)(h + 12);
        *(u32 *)key.daddr = *(const u32 *)(h + 16);
        ip_len = bpf_ntohs(*(const u16 *)(h + 2));
        u16 fo = bpf_ntohs(*(const u16 *)(h + 6));
        frag_offset = fo & 0x1fff;
        more_frags = (fo & 0x2000) != 0;
        frag_id = bpf_ntohs(*(const u16 *)(h + 4));
        l4off = (h[0] & 0x0f) * 4;
    } else if (ethertype == ETHERTYPE_IPV6) {
        h = packet_bytes(hdr, sizeof(hdr), nh, BTF_ID_IPV6HDR, direct);
        if (!h || (h[0] >> 4) != 6)
            goto undecoded;
        key.family = 6;
        ((u64 *)key.saddr)[0] = *(const u64 *)(h + 8);
        ((u64 *)key.saddr)[1] = *(const u64 *)(h + 16);
        ((u64 *)key.daddr)[0] = *(const u64 *)(h + 24);
        ((u64 *)key.daddr)[1] = *(const u64 *)(h + 32);
        u16 payload = bpf_ntohs(*(const u16 *)(h + 4));
        ip_len = payload ? payload + 40 : 0;
        l4off = 40;
        key.proto = h[6];
        if (key.proto != PROTO_TCP && key.proto != PROTO_UDP && key.proto != PROTO_ICMPV6)
            key.proto = skip_ipv6_ext(nh, key.proto, &l4off, &frag_id, &frag_offset, &more_frags);
    } else {
        goto undecoded;
    }
    if (!family_matches(key.family))
        return 0;
    if (key.proto != PROTO_TCP && key.proto != PROTO_UDP && key.proto != PROTO_ICMP &&
        key.proto != PROTO_ICMPV6)
        goto undecoded;

    u8 is_fragment = frag_offset != 0;
    if (is_fragment) {
        /* No transport header here: the ports are the first fragment's, when it passed. */
        struct frag_key fk = {.netns = key.netns, .id = frag_id, .proto = key.proto, .family = key.family};
        __builtin_memcpy(fk.saddr, key.saddr, 16);
        __builtin_memcpy(fk.daddr, key.daddr, 16);
        struct frag_ports *fp = frag_ports_map.lookup(&fk);
        if (fp) {
            key.sport = fp->sport;
            key.dport = fp->dport;
        }
    } else if (key.proto == PROTO_TCP || key.proto == PROTO_UDP) {
        u8 buf[4] __attribute__((aligned(4)));
        const u8 *ports;
        if (direct && PACKET_CASTS_ON)
            ports = packet_bytes(buf, sizeof(buf), nh + l4off, BTF_ID_UDPHDR, direct);
        else if (l4off == 20)
            ports = &hdr[20];
        else if (l4off == 40)
            ports = &hdr[40];
        else
            ports = packet_bytes(buf, sizeof(buf), nh + l4off, 0, 0);
        if (!ports)
            goto undecoded;
        key.sport = bpf_ntohs(*(const u16 *)ports);
        key.dport = bpf_ntohs(*(const u16 *)(ports + 2));
        if (more_frags) {
            struct frag_key fk = {.netns = key.netns, .id = frag_id, .proto = key.proto, .family = key.family};
            __builtin_memcpy(fk.saddr, key.saddr, 16);
            __builtin_memcpy(fk.daddr, key.daddr, 16);
            struct frag_ports fp = {.sport = key.sport, .dport = key.dport};
            frag_ports_map.update(&fk, &fp);
        }
    }
    if (!port_matches(key.sport, key.dport) || !host_matches(key.family, key.saddr, key.daddr))
        return 0;

    /* Bytes of the IP packet; BIG TCP (tot_len 0) is measured from the skb instead. */
    u64 bytes = ip_len;
    if (!bytes) {
        unsigned char *data = SKB_FIELD(unsigned char *, OFF_SKB_DATA);
        bytes = SKB_FIELD(u32, OFF_SKB_LEN) - (u32)(nh - data);
    }
    u16 gso_segs = 0;
    const u8 *shinfo = SKB_FIELD(unsigned char *, OFF_SKB_HEAD) + SKB_FIELD(u32, OFF_SKB_END);
    if (direct && PACKET_CASTS_ON)
        gso_segs = *(const u16 *)(packet_bytes(0, 0, shinfo, BTF_ID_SKB_SHARED_INFO, direct) + OFF_SHINFO_GSO_SEGS);
    else
        bpf_probe_read_kernel(&gso_segs, sizeof(gso_segs), shinfo + OFF_SHINFO_GSO_SEGS);

    int zero = 0;
    u32 *ep = control.lookup(&zero);
    u32 epoch = ep ? (*ep & 1) : 0;
    u16 segments = gso_segs > 1 ? gso_segs : 1;
    u32 slot = epoch * FLOW_CACHE_SLOTS + cache_slot(&key);
    struct cached_flow *c = flow_cache.lookup(&slot);
    if (c && same_key(&c->key, &key)) {
        c->packets += 1;              /* per-CPU, and a program does not nest on its CPU */
        c->bytes += bytes;
        c->segments += segments;
        c->fragments += is_fragment;
        return 0;
    }
    struct flow_value *fv = lookup_flow(epoch, &key);
    if (!fv) {
        int created = create_flow(epoch, &key, dev, SKB_FIELD(void *, OFF_SKB_REFDST), SKB_FIELD(void *, OFF_SKB_SK),
                                  bytes, segments, is_fragment, direct);
        if (created == FLOW_FILTERED)
            return 0;                 /* another process's flow */
        if (created == FLOW_CREATED)
            goto cache;               /* counted in the new entry */
        fv = created == FLOW_RACED ? lookup_flow(epoch, &key) : 0;
        if (!fv) {
            count_stat(STAT_LOST_PACKETS, 1);
            count_stat(STAT_LOST_BYTES, bytes);
            return 0;
        }
    }
    __sync_fetch_and_add(&fv->packets, 1);
    __sync_fetch_and_add(&fv->bytes, bytes);
    __sync_fetch_and_add(&fv->segments, segments);
    if (is_fragment)
        __sync_fetch_and_add(&fv->fragments, 1);
cache:
    if (c) {
        write_back(epoch, c);
        c->key = key;
    }
    return 0;

undecoded:
    count_stat(STAT_UNDECODED, 1);
    return 0;
}
