"""What every part of the package shares: errors the user fixes, files (local or gs://), label vocabularies, the
multi-host runtime, preemption, the mesh and sharding helpers of both trainers, and the console set-up."""
