int b( {
