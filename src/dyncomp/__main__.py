from dyncomp.cli import main

raise SystemExit(main())
