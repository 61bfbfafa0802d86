"""The control plane: what a job is and where each volume stands.

PostgreSQL holds the state (``db``, ``schema.sql``, ``jobs``, ``tasks``), SQS carries the
work (``queues``), and ``lifecycle`` walks one message from receive to verdict, top to
bottom. Job kinds (``jobkinds``) name the package that does a kind's work; ``partial``
keeps a retried volume's finished pages; ``ids`` and ``volume_list`` check what operators
type before it reaches a queue name, a key or a query.
"""
