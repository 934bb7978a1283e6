/* Tracepoint plan: for kernels without kprobes (CONFIG_KPROBES off, as on 6.18 here).
 *
 *   net_dev_queue (raw)   each skb handed to a device; route type and route device come
 *                         from the skb's dst, which the output route lookup chose (or the
 *                         sending socket's cached route, see route_of()).
 *
 * A raw tracepoint gets the skb pointer itself and skips the regular tracepoint's per-event
 * copying (net_dev_queue copies the device name into its record), which no BPF statistic shows.
 * RAW_XMIT is defined where the kernel has raw tracepoints; otherwise the regular one is used.
 *
 * Compiled after common.c and fib.c (AttachPlan.sources): bcc rewrites map calls only in
 * its main file, so the plan's files are one unit rather than #includes.
 */

#ifdef RAW_XMIT
RAW_TRACEPOINT_PROBE(net_dev_queue)
{
    return account_xmit((void *)ctx->args[0]);
}
#else
TRACEPOINT_PROBE(net, net_dev_queue)
{
    return account_xmit(args->skbaddr);
}
#endif
