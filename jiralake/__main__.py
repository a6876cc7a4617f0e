from jiralake.entry import main

raise SystemExit(main())
