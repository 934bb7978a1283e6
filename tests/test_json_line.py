"""The stream's JSON line, made from a template (render.flow_json_fast), is the encoder's."""


def test_the_templated_json_line_is_the_encoders_for_every_shape_a_live_flow_takes():
    """flow_json_line's template against the JSON encoder: one device, two devices (a flow seen
    on two), no route, no FIB, and counts of another type (the encoder's line, not a wrong one)."""
    from routetrace import bench_session
    from routetrace.events import KEY_STRUCT, decode_entry, merge_into
    from routetrace.render import flow_json_fast, flow_json_line, json_line
    key, value = bench_session.entries(1)[0]
    flow, _ = decode_entry(key, value, "tracepoint")
    assert flow_json_fast(flow) == json_line(flow.to_dict())
    other_device = KEY_STRUCT.pack(*(KEY_STRUCT.unpack(key)[:1] + (7,) + KEY_STRUCT.unpack(key)[2:]))
    part, _ = decode_entry(other_device, value, "tracepoint")
    part.devices[0]["name"] = part.devices[0]["name"] + "\x1b"       # a name that needs escaping
    merge_into(flow, part)
    flow.xmit_devs = {"eth0": 1, "eth0\x1b": 1}
    assert len(flow.devices) == 2 and flow_json_fast(flow) == json_line(flow.to_dict())
    flow.route_type = flow.route_dev = flow.route_ifindex = flow.route_loopback = flow.fib_table = None
    assert flow_json_fast(flow) == json_line(flow.to_dict())
    flow.packets = 2.5
    assert flow_json_line(flow) == json_line(flow.to_dict()) and '"packets":2.5' in flow_json_line(flow)
    flow.packets, flow.devices[1]["bytes"] = 2, None
    assert flow_json_line(flow) == json_line(flow.to_dict())
