from magic3d.cli import main

raise SystemExit(main())
