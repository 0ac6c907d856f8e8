"""The IR: a typed graph, its serialisation, passes and the reference interpreter (numpy only, never torch)."""
