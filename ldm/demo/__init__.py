"""The demo that the project trains itself (issue 14): a procedural shapes data set
(`ldm.demo.shapes`) and a deterministic analyser of generated images (`ldm.demo.score`)."""
