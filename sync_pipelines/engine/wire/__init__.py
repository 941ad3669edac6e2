"""Wire: the I/O-free ground floor — what a change looks like on its way through the engine.

* :mod:`.pgoutput` decodes (and, for snapshot rows, encodes) pgoutput protocol v1 messages;
* :mod:`.pgtypes` turns PostgreSQL's text format into Python values where mapping needs them,
  and pins the session settings that decide that text (:data:`.pgtypes.TEXT_FORMAT_SETTINGS`);
* :mod:`.change` is a stream :class:`~.change.Position` and a staged change decoded to text
  values (:class:`~.change.StoredChange`);
* :mod:`.copyrow` turns a pgoutput tuple into a line of text COPY without decoding its
  values (:class:`~.copyrow.RawRow`).

Every other stage builds on this one and it builds on none: it never touches a socket, a
database or the state, so nothing here can be left half done by a crash.
"""
