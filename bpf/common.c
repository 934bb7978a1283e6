/* Shared by every attach plan: the flow maps, the in-kernel filter and per-packet accounting.
 *
 * Struct members are never dereferenced through kernel headers: bcc may compile against
 * headers of another kernel, so every offset arrives as an OFF_* define (see offsets.py).
 * Configuration arrives the same way: FILTER_PORT, FILTER_HOST, FILTER_PID, FILTER_NETNS.
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#include <uapi/linux/in.h>
#ifdef OFFSETS_FROM_HEADERS
/* The running kernel's own headers: OFF_* are offsetof() expressions over these. */
#include <linux/skbuff.h>
#include <linux/netdevice.h>
#include <linux/nsproxy.h>
#include <net/net_namespace.h>
#include <net/route.h>
#include <net/sock.h>
#include <net/flow.h>
#endif

#define DEVNAME_LEN 16
#define ETH_P_IP_BE 0x0008            /* htons(ETH_P_IP) as read from a little-endian u16 */
#define LOOPBACK_IFINDEX 1

struct flow_key {
    u32 netns;
    u32 saddr;                        /* network byte order */
    u32 daddr;
    u16 sport;                        /* host byte order */
    u16 dport;
    u8 proto;
    u8 pad[3];
};

struct flow_value {
    u64 first_ns;
    u64 last_ns;
    u64 packets;
    u64 bytes;
    u32 pid;
    u32 fib_table;
    u16 route_type;
    u8 has_route;
    u8 has_fib;
    u32 pad;
    char comm[TASK_COMM_LEN];
    char route_dev[DEVNAME_LEN];
    char fib_dev[DEVNAME_LEN];
};

struct xmit_key {
    struct flow_key flow;
    u32 ifindex;
    u32 pad;
};

struct xmit_value {
    u64 packets;
    u64 bytes;
    char dev[DEVNAME_LEN];
};

struct fib_key {
    u32 netns;
    u32 daddr;
};

struct fib_value {
    u32 table;
    u32 pad;
    char dev[DEVNAME_LEN];
};

/* Sent once per new flow; everything else is read from the maps, so packet rate never
 * sets user-space cost. */
struct new_flow_event {
    struct flow_key key;
    u32 pad;                          /* explicit: user space reads this with packed ctypes */
    struct flow_value value;
    char xmit_dev[DEVNAME_LEN];
};

enum stat_index {
    STAT_EVENTS_DROPPED,              /* ring buffer full: a new-flow notice was lost */
    STAT_FLOW_MAP_FULL,               /* a flow could not be inserted */
    STAT_XMIT_MAP_FULL,
    STAT_MAX,
};

BPF_TABLE("lru_hash", struct flow_key, struct flow_value, flows, 16384);
BPF_TABLE("lru_hash", struct xmit_key, struct xmit_value, xmits, 32768);
BPF_TABLE("lru_hash", struct fib_key, struct fib_value, fib_answers, 4096);
BPF_ARRAY(stats, u64, STAT_MAX);

/* The kprobe plan's record of ip_route_output_key_hash's answers, by destination. */
struct route_key {
    u32 netns;
    u32 daddr;
};

struct route_value {
    u16 rt_type;
    u16 pad;
    u32 pad2;
    char dev[DEVNAME_LEN];
};

#ifdef ROUTE_DECISIONS
BPF_TABLE("lru_hash", struct route_key, struct route_value, route_answers, 4096);
#endif
BPF_RINGBUF_OUTPUT(new_flows, 64);

static __always_inline void count_stat(int idx)
{
    u64 *v = stats.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
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

static __always_inline u32 current_netns(void)
{
    void *task = (void *)bpf_get_current_task();
    void *nsproxy = read_ptr(task, OFF_TASK_NSPROXY);
    if (!nsproxy)                     /* an exiting task */
        return 0;
    return netns_of_net(read_ptr(nsproxy, OFF_NSPROXY_NET));
}

static __always_inline int port_matches(u16 sport, u16 dport)
{
#ifdef FILTER_PORT
    return sport == FILTER_PORT || dport == FILTER_PORT;
#else
    return 1;
#endif
}

static __always_inline int host_matches(u32 saddr, u32 daddr)
{
#ifdef FILTER_HOST
    return saddr == FILTER_HOST || daddr == FILTER_HOST;
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

/* The FIB's answer for a destination, kept so a flow can show "FIB said eth0, sent on lo". */
static __always_inline void remember_fib(u32 netns, u32 daddr, struct fib_value *answer)
{
    struct fib_key k = {.netns = netns, .daddr = daddr};
    fib_answers.update(&k, answer);
}

/* The route a packet was given. The skb's dst is the rtable ip_route_output_key_hash chose (dst
 * is its first member) -- but __dev_queue_xmit drops it before net:net_dev_queue fires on
 * devices with IFF_XMIT_DST_RELEASE (veth, NICs; not lo). Then the sending socket's cached
 * route is the same decision: TCP and connected UDP sockets keep it in sk_dst_cache. */
#define TCP_TIME_WAIT 6
#define TCP_NEW_SYN_RECV 12

static __always_inline void *route_of(void *skb)
{
    void *rt = (void *)((unsigned long)read_ptr(skb, OFF_SKB_REFDST) & ~1UL);
    if (rt)
        return rt;
    void *sk = read_ptr(skb, OFF_SKB_SK);
    if (!sk)
        return 0;
    u8 state = 0;
    bpf_probe_read_kernel(&state, sizeof(state), sk + OFF_SK_STATE);
    if (state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV)   /* not a full socket */
        return 0;
    return read_ptr(sk, OFF_SK_DST_CACHE);
}

/* The kprobe plan: what the routing function itself returned for this destination, as its
 * kretprobe saw it. Decisions made before tracing began fall back to the packet's route. */
static __always_inline int route_decided(struct flow_key *key, struct flow_value *init)
{
#ifdef ROUTE_DECISIONS
    struct route_key rk = {.netns = key->netns, .daddr = key->daddr};
    struct route_value *decided = route_answers.lookup(&rk);
    if (decided) {
        init->has_route = 1;
        init->route_type = decided->rt_type;
        __builtin_memcpy(init->route_dev, decided->dev, DEVNAME_LEN);
        return 1;
    }
#endif
    return 0;
}

/* Reserved and submitted in one place: older verifiers (6.1) lose track of a reservation
 * held across other branches. */
static __always_inline void notify_new_flow(struct flow_key *key, struct flow_value *init,
                                            void *dev, u16 tot_len)
{
    struct new_flow_event *ev = new_flows.ringbuf_reserve(sizeof(*ev));
    if (!ev) {
        count_stat(STAT_EVENTS_DROPPED);
        return;
    }
    ev->key = *key;
    ev->value = *init;
    ev->value.packets = 1;            /* the packet that created it, counted by the caller */
    ev->value.bytes = tot_len;
    bpf_probe_read_kernel(&ev->xmit_dev, DEVNAME_LEN, dev + OFF_NETDEV_NAME);
    new_flows.ringbuf_submit(ev, 0);
}

/* Parse an IPv4 skb about to be transmitted on `dev` and account it to its flow. */
static __always_inline int account_xmit(void *skb)
{
    u16 protocol = 0;
    bpf_probe_read_kernel(&protocol, sizeof(protocol), skb + OFF_SKB_PROTOCOL);
    if (protocol != ETH_P_IP_BE)
        return 0;

    void *dev = read_ptr(skb, OFF_SKB_DEV);
    if (!dev)
        return 0;
    struct flow_key key = {};
    key.netns = netns_of_dev(dev);
    if (!netns_matches(key.netns))
        return 0;

    unsigned char *head = read_ptr(skb, OFF_SKB_HEAD);
    u16 nh_off = 0;
    bpf_probe_read_kernel(&nh_off, sizeof(nh_off), skb + OFF_SKB_NETWORK_HEADER);
    u8 iph[20];
    if (bpf_probe_read_kernel(iph, sizeof(iph), head + nh_off))
        return 0;
    if ((iph[0] >> 4) != 4)
        return 0;
    key.proto = iph[9];
    if (key.proto != IPPROTO_TCP && key.proto != IPPROTO_UDP && key.proto != IPPROTO_ICMP)
        return 0;
    __builtin_memcpy(&key.saddr, &iph[12], 4);
    __builtin_memcpy(&key.daddr, &iph[16], 4);
    u16 tot_len = ((u16)iph[2] << 8) | iph[3];
    if (key.proto != IPPROTO_ICMP) {
        u8 ports[4];
        if (bpf_probe_read_kernel(ports, sizeof(ports), head + nh_off + (iph[0] & 0x0f) * 4))
            return 0;
        key.sport = ((u16)ports[0] << 8) | ports[1];
        key.dport = ((u16)ports[2] << 8) | ports[3];
    }
    if (!port_matches(key.sport, key.dport) || !host_matches(key.saddr, key.daddr))
        return 0;

    u64 now = bpf_ktime_get_ns();
    struct flow_value *fv = flows.lookup(&key);
    if (!fv) {
#ifdef FILTER_PID
        if ((bpf_get_current_pid_tgid() >> 32) != FILTER_PID)
            return 0;
#endif
        struct flow_value init = {.first_ns = now, .last_ns = now};
        init.pid = bpf_get_current_pid_tgid() >> 32;
        bpf_get_current_comm(&init.comm, sizeof(init.comm));
        void *rt = route_decided(&key, &init) ? 0 : route_of(skb);
        if (rt) {
            init.has_route = 1;
            bpf_probe_read_kernel(&init.route_type, sizeof(init.route_type), rt + OFF_RTABLE_RT_TYPE);
            void *rdev = read_ptr(rt, OFF_DST_DEV);
            if (rdev)
                bpf_probe_read_kernel(&init.route_dev, DEVNAME_LEN, rdev + OFF_NETDEV_NAME);
        }
        struct fib_key fk = {.netns = key.netns, .daddr = key.daddr};
        struct fib_value *fib = fib_answers.lookup(&fk);
        if (fib) {
            init.has_fib = 1;
            init.fib_table = fib->table;
            __builtin_memcpy(init.fib_dev, fib->dev, DEVNAME_LEN);
        }
        int created = flows.insert(&key, &init) == 0;
        fv = flows.lookup(&key);      /* inserted by us or, racing, by another CPU */
        if (!fv) {
            count_stat(STAT_FLOW_MAP_FULL);
            return 0;
        }
        if (created)
            notify_new_flow(&key, &init, dev, tot_len);
    }
    fv->last_ns = now;
    __sync_fetch_and_add(&fv->packets, 1);
    __sync_fetch_and_add(&fv->bytes, tot_len);

    struct xmit_key xk = {.flow = key};
    bpf_probe_read_kernel(&xk.ifindex, sizeof(xk.ifindex), dev + OFF_NETDEV_IFINDEX);
    struct xmit_value *xv = xmits.lookup(&xk);
    if (!xv) {
        struct xmit_value xinit = {};
        bpf_probe_read_kernel(&xinit.dev, DEVNAME_LEN, dev + OFF_NETDEV_NAME);
        xmits.insert(&xk, &xinit);
        xv = xmits.lookup(&xk);
    }
    if (xv) {
        __sync_fetch_and_add(&xv->packets, 1);
        __sync_fetch_and_add(&xv->bytes, tot_len);
    } else {
        count_stat(STAT_XMIT_MAP_FULL);
    }
    return 0;
}
