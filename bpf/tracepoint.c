/* Tracepoint plan: for kernels without kprobes (CONFIG_KPROBES off, as on 6.18 here).
 *
 *   net_dev_queue         each skb handed to a device; route type and route device come
 *                         from the skb's dst, which the output route lookup chose (or the
 *                         sending socket's cached route, see route_of()).
 *
 * Three ways onto that tracepoint, cheapest first (probes.py picks, tracer.py falls back):
 *   xmit_btf   a BTF-typed tracepoint (tp_btf, 5.5+): the skb arrives as a typed pointer, so the
 *              skb, its device and the device's namespace are read by plain loads the verifier
 *              checks against BTF -- no bpf_probe_read_kernel call for them. Loaded by tracer.py
 *              (bcc cannot), so named without bcc's auto-attach prefix.
 *   xmit_raw   a raw tracepoint: the skb pointer itself, every field through a helper call.
 *              It skips the regular tracepoint's per-event copying (net_dev_queue copies the
 *              device name), which no BPF statistic shows.
 *   the regular tracepoint, where the kernel has no raw tracepoints.
 *
 * Compiled after common.c and fib.c (AttachPlan.sources): bcc rewrites map calls only in
 * its main file, so the plan's files are one unit rather than #includes.
 */

#ifdef RAW_XMIT
#ifdef XMIT_BTF
int xmit_btf(u64 *ctx)
{
    return account_xmit((void *)ctx[0], 1);
}
#endif

int xmit_raw(struct bpf_raw_tracepoint_args *ctx)
{
    return account_xmit((void *)ctx->args[0], 0);
}
#else
TRACEPOINT_PROBE(net, net_dev_queue)
{
    return account_xmit(args->skbaddr, 0);
}
#endif
