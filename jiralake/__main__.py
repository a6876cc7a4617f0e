from jiralake.cli import main

raise SystemExit(main())
