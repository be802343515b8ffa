class { int f( { ;;; } } }} template<<< #if
#endif #endif
"unterminated
/* open comment