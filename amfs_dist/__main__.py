from amfs_dist.cli import main

raise SystemExit(main())
